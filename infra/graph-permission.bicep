// Microsoft Graph application permissions (app role assignments) for the function's managed
// identity, with the Microsoft Graph Bicep extension (declared in bicepconfig.json).
//
// Optional: main.bicep deploys this only when grantGraphPermissions is true. Granting an app role
// of Microsoft Graph needs a Privileged Role Administrator (or Global Administrator) of the
// tenant, and the extension only accepts interactive deployments from Azure CLI or Azure
// PowerShell sign-ins (or an app-only pipeline identity holding AppRoleAssignment.ReadWrite.All
// and Application.Read.All). Where that is not the deployer, leave this off and have an
// administrator run infra/scripts/grant-graph-permission.sh, which grants the same roles with
// the same ids (tests/test_infra.py checks that the two tables agree).
//
// The first deployment may fail with "Not a valid reference update": the identity was created a
// moment ago and Entra has not replicated it yet (msgraph-bicep-types issue 193, open; the
// extension has no retry setting). Running `azd provision` again completes it.
//
// Unverified here (no network): that the extension is offered in the US Government clouds (use
// the script there), and that redeploying an existing assignment is a no-op.
extension microsoftGraphV1

@description('Object id of the managed identity (its service principal).')
param principalId string

@description('Names of the Microsoft Graph application permissions to grant; each must be a key of graphAppRoleIds. main.bicep leaves the module out when there are none.')
param appRoles array

// Microsoft Graph app role ids. Microsoft Graph defines them once (appId
// 00000003-0000-0000-c000-000000000000), so they are the same in every tenant. Sources: the Graph
// permissions reference as mirrored in docs/research (research/graph.md section 1.1) and public
// permission tables.
var graphAppRoleIds = {
  'TeamsAppInstallation.ReadWriteForUser.All': '74ef0291-ca83-4d02-8c7e-d2391e6a444f'
  'TeamsAppInstallation.ReadWriteAndConsentForUser.All': '32ca478f-f89e-41d0-aaf8-101deb7da510'
  'TeamsAppInstallation.ReadWriteForTeam.All': '5dad17ba-f6cc-4954-a5a2-a0dcc95154f0'
  'TeamsAppInstallation.ReadWriteAndConsentForTeam.All': 'b0c13be0-8e20-4bc5-8c55-963c23a39ce9'
  'TeamsAppInstallation.ReadWriteForChat.All': '9e19bae1-2623-4c4f-ab6e-2664615ff9a0'
  'TeamsAppInstallation.ReadWriteAndConsentForChat.All': '6e74eff9-4a21-45d6-bc03-3a20f61f8281'
  'GroupMember.Read.All': '98830695-27a2-44f7-8c18-0c3ebc9698f6'
  'AppCatalog.Read.All': 'e12dae10-5a57-4817-b79d-dfbec5348930'
}

resource microsoftGraph 'Microsoft.Graph/servicePrincipals@v1.0' existing = {
  appId: '00000003-0000-0000-c000-000000000000'
}

resource grants 'Microsoft.Graph/appRoleAssignedTo@v1.0' = [
  for appRole in appRoles: {
    principalId: principalId
    resourceId: microsoftGraph.id
    appRoleId: graphAppRoleIds[appRole]
  }
]

output grantedAppRoles array = appRoles
