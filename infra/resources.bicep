// Everything Azure for the Teams App Upgrader, in one resource group. Called by main.bicep.
//
// Identity only: one user-assigned managed identity reaches host storage, Service Bus and
// Application Insights; account keys are off everywhere (storage allowSharedKeyAccess: false,
// Service Bus and Application Insights disableLocalAuth: true) and no connection string to
// storage or Service Bus exists. Roles are data-plane roles on the narrowest scope that works.
//
// API versions were checked against reference material available offline (research notes,
// Azure-Samples Flex Consumption templates); the template was not compiled here. Anything not
// confirmed is marked "unverified" next to it.

@description('Region of every resource.')
param location string

@description('Tags for every resource.')
param tags object

@description('<prefix>-<unique suffix>; each resource adds its kind (-func, -plan, -bus, ...).')
param baseName string

@minLength(3)
@maxLength(24)
@description('Storage account names allow only lowercase letters and digits.')
param storageAccountName string

@description('GRAPH_BASE_URL: the Microsoft Graph root of the tenant cloud.')
param graphBaseUrl string

@allowed([
  'Standard'
  'Premium'
])
param serviceBusSku string

@minValue(1)
@maxValue(1000)
param maximumInstanceCount int

@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int

@minValue(1)
@maxValue(64)
param perInstanceConcurrency int

param upgradeQueueName string
param deadLetterQueueName string

@minValue(1)
@maxValue(50)
param maxAttempts int

@minValue(0)
@maxValue(120)
param maxInlineWaitSeconds int

@minValue(2)
@maxValue(9)
param maxDeliveryCount int

param graphMaxRequestsPerSecond string

@minValue(0)
@maxValue(240)
param maxBudgetWaitSeconds int

@minValue(1)
@maxValue(336)
param maxRetryHours int

@minLength(3)
@maxLength(63)
@description('GRAPH_BUDGET_TABLE: the shared Graph budget of every instance (contract section 7).')
param graphBudgetTableName string

@minLength(3)
@maxLength(63)
@description('ROLLOUT_TABLE: the rollout ledger (contract section 8).')
param rolloutTableName string

@description('Object id of the deployer, or empty for no deployer access (main.bicep decides).')
param deployerPrincipalId string

@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param deployerPrincipalType string

// Built-in role definition ids (the same in every tenant and cloud). Nothing else is assigned:
// no Owner, Contributor or Storage Account Contributor, and nothing at namespace or account scope
// that a narrower scope can do.
var roleIds = {
  // Everything on ONE queue, the upgrade queue: receive (the trigger), send (scheduled retries,
  // fan-out children, continuations) and manage. Manage is what target-based scaling needs: with
  // an identity connection the Service Bus extension reads the queue's length through
  // GetQueueRuntimePropertiesAsync, which Data Receiver may not call; without it the extension
  // falls back to peeking and reports about one message, so Flex Consumption scales to about one
  // instance however long the queue is (MicrosoftDocs/azure-docs pull request 128626). The role
  // subsumes Data Receiver and Data Sender, so neither is assigned on this queue as well. Scoped
  // to the queue, "manage" reaches nothing else in the namespace. Why granting it is safe now:
  // every instance draws from one shared Graph budget (contract section 7), so more instances
  // no longer mean more calls to Graph.
  serviceBusDataOwner: '090c5cfd-751d-490a-894a-3ce6f1109419'
  // Receive on one queue: the deployer reads the dead-letter queue.
  serviceBusDataReceiver: '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0'
  // Send on one queue: failed requests to the dead-letter queue; the deployer's test requests.
  serviceBusDataSender: '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39'
  // Host storage and the deployment container. Microsoft documents this role as the minimum
  // for Functions host storage by identity: the host reads and writes blobs (locks, keys) and
  // creates containers, and Flex Consumption reads the app package from the deployment
  // container with the same identity. Storage Blob Data Contributor would probably do, but it
  // is not documented as sufficient. The account holds nothing but this app's host data.
  // Queue roles are left out: a Service Bus trigger needs no storage queues.
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  // Read and write entities of one table: the app's identity on the shared Graph budget and on
  // the rollout ledger, each role assignment scoped to that table alone. The tables are created
  // here, so the identity needs no right to create tables or to read any other. (The Functions
  // host also writes diagnostic events to a table of its own when it can; without access to it
  // the host only skips them.)
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  // Read entities of one table: the deployer (or a release pipeline) reads the rollout ledger
  // with `python -m upgrade_handler rollout status`.
  storageTableDataReader: '76199698-9eea-4c19-bc75-cec21354c6b6'
  // Send telemetry to an Application Insights resource that refuses instrumentation-key-only
  // ingestion (DisableLocalAuth).
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}

var deploymentContainerName = 'app-package'
var standardServiceBusSku = {
  name: 'Standard'
  tier: 'Standard'
}
var premiumServiceBusSku = {
  name: 'Premium'
  tier: 'Premium'
  capacity: 1 // messaging units
}
// azd deploys the service named "upgrader" in azure.yaml to the resource with this tag.
var functionAppTags = union(tags, {
  'azd-service-name': 'upgrader'
})
var deployerHasAccess = !empty(deployerPrincipalId)

// ---------------------------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------------------------

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${baseName}-identity'
  location: location
  tags: tags
}

// ---------------------------------------------------------------------------------------------
// Monitoring: Log Analytics workspace and workspace-based Application Insights
// ---------------------------------------------------------------------------------------------

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: '${baseName}-logs'
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: 30
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: '${baseName}-insights'
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logAnalytics.id
    IngestionMode: 'LogAnalytics'
    // Telemetry is accepted only with an Entra token (APPLICATIONINSIGHTS_AUTHENTICATION_STRING).
    DisableLocalAuth: true
  }
}

// ---------------------------------------------------------------------------------------------
// Storage: host storage (AzureWebJobsStorage) and the Flex Consumption deployment container
// ---------------------------------------------------------------------------------------------

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: storageAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    allowSharedKeyAccess: false
    allowBlobPublicAccess: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
  }

  resource blobService 'blobServices' = {
    name: 'default'

    resource deploymentContainer 'containers' = {
      name: deploymentContainerName
      properties: {
        publicAccess: 'None'
      }
    }
  }

  resource tableService 'tableServices' = {
    name: 'default'
  }
}

// The two tables the app reads and writes, created here so that the identity's roles can be
// scoped to each of them (a role on a table that does not exist yet cannot be assigned). The
// code also creates a missing table, which only succeeds with a wider role: it never needs to.
resource graphBudgetTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: storage::tableService
  name: graphBudgetTableName
}

resource rolloutTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: storage::tableService
  name: rolloutTableName
}

// ---------------------------------------------------------------------------------------------
// Service Bus: the upgrade queue (trigger + scheduled retries) and the dead-letter queue
// ---------------------------------------------------------------------------------------------

resource serviceBus 'Microsoft.ServiceBus/namespaces@2024-01-01' = {
  name: '${baseName}-bus' // a namespace name may not end in -sb or -mgmt
  location: location
  tags: tags
  sku: serviceBusSku == 'Premium' ? premiumServiceBusSku : standardServiceBusSku
  properties: {
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
    publicNetworkAccess: 'Enabled'
  }
}

resource upgradeQueue 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' = {
  parent: serviceBus
  name: upgradeQueueName
  properties: {
    // The broker's own dead-lettering (to <queue>/$deadletterqueue, reason
    // MaxDeliveryCountExceeded) is the last resort: the function's poison guard
    // (UPGRADE_MAX_DELIVERY_COUNT, at most 9) dead-letters with its own reason first.
    maxDeliveryCount: 10
    // How long a delivery stays invisible to other instances. The host renews the lock while
    // the invocation runs (maxAutoLockRenewalDuration 00:05:00 in host.json), so this only has
    // to cover the longest stretch without a renewal: the largest allowed inline wait (120 s)
    // plus one Graph request timeout (30 s). It is also how long a message held by a crashed
    // instance stays hidden before it is delivered again. Service Bus allows at most PT5M.
    lockDuration: 'PT2M30S'
    // Retry copies carry ids <original>:retry:<attempt>, fan-out children ids derived from the
    // parent: a copy sent twice (crash between send and complete) is dropped. The window
    // covers every redelivery of a crashed invocation (5 deliveries x 2.5 min before the poison
    // guard). A producer that resends the same message id within the window is dropped too:
    // replays get a new message id (docs/deploying.md).
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: 'PT1H'
    // A request nobody processed in 14 days goes to <queue>/$deadletterqueue instead of vanishing.
    defaultMessageTimeToLive: 'P14D'
    deadLetteringOnMessageExpiration: true
    requiresSession: false
    enablePartitioning: false
    maxSizeInMegabytes: 1024
  }
}

resource deadLetterQueue 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' = {
  parent: serviceBus
  name: deadLetterQueueName
  properties: {
    // The function sends each failure with the original message id: a second copy (crash
    // between the send and the completion) is dropped within the window.
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: 'PT1H'
    // Failed requests wait here for an operator; bodies name users, so they do not stay forever.
    defaultMessageTimeToLive: 'P90D'
    deadLetteringOnMessageExpiration: false
    maxDeliveryCount: 10
    lockDuration: 'PT1M'
    requiresSession: false
    enablePartitioning: false
    maxSizeInMegabytes: 5120
  }
}

// Host name of the namespace for ServiceBusConnection__fullyQualifiedNamespace, taken from the
// endpoint the service reports (https://<name>.servicebus.windows.net:443/) so that it is right
// in every cloud.
var serviceBusHostName = replace(split(replace(serviceBus.properties.serviceBusEndpoint, 'https://', ''), ':')[0], '/', '')

// ---------------------------------------------------------------------------------------------
// Function app: Flex Consumption, Python 3.11, user-assigned identity
// ---------------------------------------------------------------------------------------------

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: '${baseName}-plan'
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true // Linux
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: '${baseName}-func'
  location: location
  tags: functionAppTags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    siteConfig: {
      minTlsVersion: '1.2'
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identity.id
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
        // Only HTTP concurrency is a site property on Flex Consumption (triggers.http).
        // Service Bus concurrency per instance comes from host.json maxConcurrentCalls, which
        // is also the target per instance of target-based scaling; the app setting below
        // overrides it.
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
  // The deployment container must exist before the app points at it.
  dependsOn: [
    storage::blobService::deploymentContainer
  ]
}

// Every app setting the code reads (upgrade_handler/settings.py DEFAULTS) plus the host's.
// Not set on purpose: ServiceBusConnection (a connection string, local development only) and
// the settings Flex Consumption rejects (FUNCTIONS_WORKER_RUNTIME, FUNCTIONS_EXTENSION_VERSION,
// WEBSITE_RUN_FROM_PACKAGE, WEBSITE_CONTENTSHARE, ...): runtime and version live in
// functionAppConfig.runtime.
var appSettings = {
  // Host storage by identity: the blob service for the host (locks and keys) and the table
  // service for the app (the shared Graph budget and the rollout ledger, which the code reaches
  // through AzureWebJobsStorage__tableServiceUri with the same credential and client id). Service
  // URIs rather than AzureWebJobsStorage__accountName, which only works in the global cloud.
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identity.properties.clientId
  AzureWebJobsStorage__blobServiceUri: storage.properties.primaryEndpoints.blob
  AzureWebJobsStorage__tableServiceUri: storage.properties.primaryEndpoints.table
  // Application Insights with Entra authentication (the resource refuses anything else).
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsights.properties.ConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identity.properties.clientId};Authorization=AAD'
  // The trigger and the function's own senders reach Service Bus by identity.
  ServiceBusConnection__fullyQualifiedNamespace: serviceBusHostName
  ServiceBusConnection__credential: 'managedidentity'
  ServiceBusConnection__clientId: identity.properties.clientId
  // The Graph token comes from the same user-assigned identity.
  AZURE_CLIENT_ID: identity.properties.clientId
  UPGRADE_QUEUE_NAME: upgradeQueue.name
  DEADLETTER_QUEUE_NAME: deadLetterQueue.name
  GRAPH_BASE_URL: graphBaseUrl
  UPGRADE_MAX_ATTEMPTS: string(maxAttempts)
  UPGRADE_MAX_INLINE_WAIT_SECONDS: string(maxInlineWaitSeconds)
  UPGRADE_MAX_DELIVERY_COUNT: string(maxDeliveryCount)
  GRAPH_MAX_REQUESTS_PER_SECOND: graphMaxRequestsPerSecond
  UPGRADE_MAX_BUDGET_WAIT_SECONDS: string(maxBudgetWaitSeconds)
  UPGRADE_MAX_RETRY_HOURS: string(maxRetryHours)
  GRAPH_BUDGET_TABLE: graphBudgetTable.name
  ROLLOUT_TABLE: rolloutTable.name
  // Overrides host.json extensions.serviceBus.maxConcurrentCalls (the per-instance concurrency).
  // Unverified: whether the Flex scale controller reads this override or host.json when it
  // computes the target per instance; the defaults are equal, so they agree unless changed.
  AzureFunctionsJobHost__extensions__serviceBus__maxConcurrentCalls: string(perInstanceConcurrency)
}

resource functionAppSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: functionApp
  name: 'appsettings'
  properties: appSettings
  // The host starts when its settings arrive; give it its roles first (role propagation can
  // still lag a few minutes, and the host retries).
  dependsOn: [
    storageBlobDataOwner
    graphBudgetTableContributor
    rolloutTableContributor
    upgradeQueueOwner
    deadLetterQueueSender
    appInsightsMetricsPublisher
  ]
}

// ---------------------------------------------------------------------------------------------
// Role assignments of the function's identity
// ---------------------------------------------------------------------------------------------

resource upgradeQueueOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(upgradeQueue.id, identity.id, roleIds.serviceBusDataOwner)
  scope: upgradeQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.serviceBusDataOwner)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
    description: 'Trigger, scheduled retries, fan-out children, and the queue length for scaling'
  }
}

resource deadLetterQueueSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(deadLetterQueue.id, identity.id, roleIds.serviceBusDataSender)
  scope: deadLetterQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.serviceBusDataSender)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
    description: 'Failed requests'
  }
}

resource storageBlobDataOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identity.id, roleIds.storageBlobDataOwner)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataOwner)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
    description: 'Functions host storage and the deployment package'
  }
}

resource graphBudgetTableContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(graphBudgetTable.id, identity.id, roleIds.storageTableDataContributor)
  scope: graphBudgetTable
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageTableDataContributor)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
    description: 'The shared Graph budget of every instance'
  }
}

resource rolloutTableContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(rolloutTable.id, identity.id, roleIds.storageTableDataContributor)
  scope: rolloutTable
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageTableDataContributor)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
    description: 'The rollout ledger'
  }
}

resource appInsightsMetricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, identity.id, roleIds.monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.monitoringMetricsPublisher)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
    description: 'Telemetry with Entra authentication'
  }
}

// ---------------------------------------------------------------------------------------------
// Role assignments of the deployer (optional): send a first request, read what failed, follow
// a rollout
// ---------------------------------------------------------------------------------------------

resource deployerUpgradeQueueSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (deployerHasAccess) {
  name: guid(upgradeQueue.id, deployerPrincipalId, roleIds.serviceBusDataSender)
  scope: upgradeQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.serviceBusDataSender)
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
    description: 'Deployer: send test requests'
  }
}

resource deployerDeadLetterQueueReceiver 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (deployerHasAccess) {
  name: guid(deadLetterQueue.id, deployerPrincipalId, roleIds.serviceBusDataReceiver)
  scope: deadLetterQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.serviceBusDataReceiver)
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
    description: 'Deployer: inspect failed requests'
  }
}

resource deployerRolloutTableReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (deployerHasAccess) {
  name: guid(rolloutTable.id, deployerPrincipalId, roleIds.storageTableDataReader)
  scope: rolloutTable
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageTableDataReader)
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
    description: 'Deployer: follow rollouts (rollout status)'
  }
}

// ---------------------------------------------------------------------------------------------

output functionAppName string = functionApp.name
output identityName string = identity.name
output identityClientId string = identity.properties.clientId
output identityPrincipalId string = identity.properties.principalId
output serviceBusNamespaceName string = serviceBus.name
output serviceBusHostName string = serviceBusHostName
output tableServiceUri string = storage.properties.primaryEndpoints.table
output applicationInsightsName string = appInsights.name
output logAnalyticsWorkspaceName string = logAnalytics.name
