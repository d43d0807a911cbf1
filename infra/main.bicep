// Teams App Upgrader: the whole deployment, for `azd up` (or `az deployment sub create`).
//
// Subscription scope: creates the resource group, then `resources.bicep` (everything Azure) and,
// when `grantGraphPermissions` is true, `graph-permission.bicep` (the Microsoft Graph application
// permissions of the function's managed identity, through the Microsoft Graph Bicep extension).
//
// Plain resources only: no registry modules (`br/public:`), so nothing but the Graph extension is
// restored at build time. Not compiled on the machine this was written on (no Bicep CLI offline);
// `tests/test_infra.py` holds these files to the code instead. See docs/deploying.md.
targetScope = 'subscription'

// ---------------------------------------------------------------------------------------------
// Where and what to call things
// ---------------------------------------------------------------------------------------------

@minLength(1)
@maxLength(64)
@description('azd environment name; part of the resource group name and of the unique suffix of every resource.')
param environmentName string

// The regions of Microsoft's own Flex Consumption azd templates
// (Azure-Samples/functions-quickstart-python-http-azd, infra/main.bicep), without the canary region
// eastus2euap. azd offers only these when it asks for a location. Flex Consumption keeps adding
// regions: `az functionapp list-flexconsumption-locations -o table` has the current list, and a
// region that has it may be added here.
@minLength(1)
@allowed([
  'australiaeast'
  'australiasoutheast'
  'brazilsouth'
  'canadacentral'
  'centralindia'
  'centralus'
  'eastasia'
  'eastus'
  'eastus2'
  'francecentral'
  'germanywestcentral'
  'italynorth'
  'japaneast'
  'koreacentral'
  'northcentralus'
  'northeurope'
  'norwayeast'
  'southafricanorth'
  'southcentralus'
  'southeastasia'
  'southindia'
  'spaincentral'
  'swedencentral'
  'uaenorth'
  'uksouth'
  'ukwest'
  'westcentralus'
  'westeurope'
  'westus'
  'westus2'
  'westus3'
])
@metadata({
  azd: {
    type: 'location'
  }
})
@description('Azure region for every resource; one that offers the Flex Consumption plan.')
param location string

@description('Resource group to create. Empty: rg-<environmentName>.')
param resourceGroupName string = ''

@minLength(3)
@maxLength(10)
@description('Letters only; first part of every resource name (<prefix>-<unique suffix>-<kind>). Upper case is lowered: storage account names allow only lowercase letters and digits.')
param namePrefix string = 'upgrader'

// ---------------------------------------------------------------------------------------------
// Cloud and Microsoft Graph
// ---------------------------------------------------------------------------------------------

@allowed([
  'global'
  'usgov'
  'usgovdod'
])
@description('Microsoft 365 cloud of the tenant whose Teams apps are upgraded: global (also GCC), usgov (GCC High), usgovdod (DoD). Sets GRAPH_BASE_URL. User-scope upgrades in app context are not supported by Microsoft in GCC High and DoD; team and chat scopes are.')
param graphCloud string = 'global'

// One parameter per Teams scope, each a single Microsoft Graph application permission (or none),
// so that azd can set them from plain environment values. The ...AndConsent... variant is needed
// when that scope's requests carry consentedPermissionSet. The ...Self... permissions are left out
// on purpose: they only work when the caller is the Teams app itself (its webApplicationInfo.id),
// which a managed identity is not (research/graph.md section 1.4).

@allowed([
  'TeamsAppInstallation.ReadWriteForUser.All'
  'TeamsAppInstallation.ReadWriteAndConsentForUser.All'
  'none'
])
@description('Permission for user-scope (personal) upgrades and for fan-out requests.')
param userScopePermission string = 'TeamsAppInstallation.ReadWriteForUser.All'

@allowed([
  'none'
  'TeamsAppInstallation.ReadWriteForTeam.All'
  'TeamsAppInstallation.ReadWriteAndConsentForTeam.All'
])
@description('Permission for team-scope upgrades (teamId requests).')
param teamScopePermission string = 'none'

@allowed([
  'none'
  'TeamsAppInstallation.ReadWriteForChat.All'
  'TeamsAppInstallation.ReadWriteAndConsentForChat.All'
])
@description('Permission for chat-scope upgrades (chatId requests).')
param chatScopePermission string = 'none'

@description('Fan-out by Entra group (groupId requests, contract section 6) needs GroupMember.Read.All. True grants it; set false when producers never send groupId.')
param enableGroupFanOut bool = true

@description('Version-aware rollouts (requests with version, contract section 8) read the Teams app catalog, which needs AppCatalog.Read.All. True grants it; set false when producers never send version.')
param enableVersionChecks bool = true

@description('Grant the Graph permissions in this deployment (Microsoft Graph Bicep extension). The deploying user must then be a Privileged Role Administrator (or Global Administrator) of the tenant. The first run may fail while Entra replicates the new identity; running azd provision again completes it. False: run infra/scripts/grant-graph-permission.sh as such an administrator instead.')
param grantGraphPermissions bool = false

// ---------------------------------------------------------------------------------------------
// Sizing: Service Bus and the function's scale
// ---------------------------------------------------------------------------------------------

@allowed([
  'Standard'
  'Premium'
])
@description('Service Bus tier. Standard is the smallest with duplicate detection and scheduled messages; Premium adds isolation and VNet features at a fixed hourly price.')
param serviceBusSku string = 'Standard'

@minValue(1)
@maxValue(1000)
@description('Flex Consumption maximum instance count. 40 is the lowest value Flex Consumption accepts in most regions (lower values are a preview in a few), so 40 deploys everywhere. The count is harmless to Graph: every instance draws from one shared budget of GRAPH_MAX_REQUESTS_PER_SECOND (contract section 7).')
param maximumInstanceCount int = 40

@allowed([
  512
  2048
  4096
])
@description('Memory of one Flex Consumption instance in MB (CPU scales with it).')
param instanceMemoryMB int = 2048

@minValue(1)
@maxValue(64)
@description('Service Bus messages one instance processes at once. Written to the app setting AzureFunctionsJobHost__extensions__serviceBus__maxConcurrentCalls, which overrides host.json (16).')
param perInstanceConcurrency int = 16

// ---------------------------------------------------------------------------------------------
// App settings the code reads (upgrade_handler/settings.py DEFAULTS); defaults equal the code's
// ---------------------------------------------------------------------------------------------

@description('UPGRADE_QUEUE_NAME: the trigger queue, also where retries are scheduled.')
param upgradeQueueName string = 'teams-app-upgrades'

@description('DEADLETTER_QUEUE_NAME: where failed requests go.')
param deadLetterQueueName string = 'teams-app-upgrades-deadletter'

@minValue(1)
@maxValue(50)
@description('UPGRADE_MAX_ATTEMPTS: attempts for one request before RetriesExhausted.')
param maxAttempts int = 8

@minValue(0)
@maxValue(120)
@description('UPGRADE_MAX_INLINE_WAIT_SECONDS: the longest wait done inside one invocation (the queue lock duration covers the largest allowed value).')
param maxInlineWaitSeconds int = 10

@minValue(2)
@maxValue(9)
@description('UPGRADE_MAX_DELIVERY_COUNT: the poison guard. At most 9, below the upgrade queue maxDeliveryCount (10), so the function dead-letters with its own reason before the broker does.')
param maxDeliveryCount int = 5

@description('GRAPH_MAX_REQUESTS_PER_SECOND: Graph requests per second of the whole app, every instance together (a decimal string; contract section 7). Graph allows about 30 per app per tenant.')
param graphMaxRequestsPerSecond string = '30'

@minValue(0)
@maxValue(240)
@description('UPGRADE_MAX_BUDGET_WAIT_SECONDS: the longest one invocation waits for its turn in the shared Graph budget before it schedules a retry. At most 240, inside host.json functionTimeout and lock renewal (5 minutes).')
param maxBudgetWaitSeconds int = 240

@minValue(1)
@maxValue(336)
@description('UPGRADE_MAX_RETRY_HOURS: no retry comes due later than this after the first attempt. At most 336 (14 days, the upgrade queue message time to live).')
param maxRetryHours int = 24

@minLength(3)
@maxLength(63)
@description('GRAPH_BUDGET_TABLE: table of the shared Graph budget in the app storage account (letters and digits, a letter first).')
param graphBudgetTableName string = 'graphbudget'

@minLength(3)
@maxLength(63)
@description('ROLLOUT_TABLE: table of the rollout ledger in the app storage account (letters and digits, a letter first).')
param rolloutTableName string = 'rollouts'

// ---------------------------------------------------------------------------------------------
// The person or pipeline running the deployment (azd fills these)
// ---------------------------------------------------------------------------------------------

@description('Object id of the deployer. azd always fills it with the signed-in principal (AZURE_PRINCIPAL_ID), so it cannot be left empty through azd: use grantDeployerAccess to opt out.')
param deployerPrincipalId string = ''

@description('True: the deployer may send to the upgrade queue (first request), read the dead-letter queue and read the rollout ledger. False: the deployer gets no role (for a pipeline identity, for instance).')
param grantDeployerAccess bool = true

@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param deployerPrincipalType string = 'User'

// ---------------------------------------------------------------------------------------------

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
// Storage account names allow only lowercase letters and digits; every name uses the same prefix.
var prefix = toLower(namePrefix)
var tags = {
  'azd-env-name': environmentName
}

// GRAPH_BASE_URL per cloud; the values are upgrade_handler.settings.GRAPH_CLOUD_ROOTS.
var graphBaseUrls = {
  global: 'https://graph.microsoft.com'
  usgov: 'https://graph.microsoft.us'
  usgovdod: 'https://dod-graph.microsoft.us'
}

// The Graph application permissions of the identity, as granted by graph-permission.bicep or by
// infra/scripts/grant-graph-permission.sh (which reads the GRAPH_APP_ROLES output).
var scopePermissions = filter([userScopePermission, teamScopePermission, chatScopePermission], permission => permission != 'none')
var graphAppRoles = concat(
  scopePermissions,
  enableGroupFanOut ? ['GroupMember.Read.All'] : [],
  enableVersionChecks ? ['AppCatalog.Read.All'] : []
)

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: !empty(resourceGroupName) ? resourceGroupName : 'rg-${environmentName}'
  location: location
  tags: tags
}

module resources 'resources.bicep' = {
  name: 'resources'
  scope: rg
  params: {
    location: location
    tags: tags
    baseName: '${prefix}-${resourceToken}'
    storageAccountName: take('${prefix}${resourceToken}', 24)
    graphBaseUrl: graphBaseUrls[graphCloud]
    serviceBusSku: serviceBusSku
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    perInstanceConcurrency: perInstanceConcurrency
    upgradeQueueName: upgradeQueueName
    deadLetterQueueName: deadLetterQueueName
    maxAttempts: maxAttempts
    maxInlineWaitSeconds: maxInlineWaitSeconds
    maxDeliveryCount: maxDeliveryCount
    graphMaxRequestsPerSecond: graphMaxRequestsPerSecond
    maxBudgetWaitSeconds: maxBudgetWaitSeconds
    maxRetryHours: maxRetryHours
    graphBudgetTableName: graphBudgetTableName
    rolloutTableName: rolloutTableName
    deployerPrincipalId: grantDeployerAccess ? deployerPrincipalId : ''
    deployerPrincipalType: deployerPrincipalType
  }
}

// Assigning an app role to an identity created a moment ago can fail with "Not a valid reference
// update" while Entra replicates it (msgraph-bicep-types issue 193; the extension has no retry):
// running `azd provision` again completes the grant. With every permission switched off there is
// nothing to grant, and the module is left out.
module graphPermission 'graph-permission.bicep' = if (grantGraphPermissions && !empty(graphAppRoles)) {
  name: 'graph-permission'
  scope: rg
  params: {
    principalId: resources.outputs.identityPrincipalId
    appRoles: graphAppRoles
  }
}

// ---------------------------------------------------------------------------------------------
// Outputs: azd stores them in .azure/<env>/.env. The ones spelled like app settings let
// `python -m upgrade_handler send` run from a shell where `azd env get-values` was loaded.
// ---------------------------------------------------------------------------------------------

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = resources.outputs.functionAppName
output AZURE_MANAGED_IDENTITY_NAME string = resources.outputs.identityName
output AZURE_MANAGED_IDENTITY_CLIENT_ID string = resources.outputs.identityClientId
output AZURE_MANAGED_IDENTITY_PRINCIPAL_ID string = resources.outputs.identityPrincipalId
output AZURE_SERVICE_BUS_NAMESPACE string = resources.outputs.serviceBusNamespaceName
output ServiceBusConnection__fullyQualifiedNamespace string = resources.outputs.serviceBusHostName
output UPGRADE_QUEUE_NAME string = upgradeQueueName
output DEADLETTER_QUEUE_NAME string = deadLetterQueueName
output GRAPH_BASE_URL string = graphBaseUrls[graphCloud]
// For `python -m upgrade_handler rollout status` run from a shell where `azd env get-values` was
// loaded: the ledger's table endpoint (read with your own Azure sign-in) and table name.
output AzureWebJobsStorage__tableServiceUri string = resources.outputs.tableServiceUri
output ROLLOUT_TABLE string = rolloutTableName
output GRAPH_APP_ROLES string = join(graphAppRoles, ',')
output GRAPH_PERMISSIONS_GRANTED_BY_DEPLOYMENT bool = grantGraphPermissions
output APPLICATIONINSIGHTS_NAME string = resources.outputs.applicationInsightsName
output LOG_ANALYTICS_WORKSPACE_NAME string = resources.outputs.logAnalyticsWorkspaceName
