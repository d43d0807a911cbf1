#!/usr/bin/env bash
# Grant the function's managed identity its Microsoft Graph application permissions with `az rest`.
#
# The alternative to grantGraphPermissions=true (infra/graph-permission.bicep), for tenants where
# the person running `azd up` may not grant Graph permissions. It grants the same app roles, with
# the same ids, and is safe to run again: roles already granted are left alone.
#
# WHO MUST RUN IT: a Privileged Role Administrator or Global Administrator of the Microsoft Entra
# tenant (assigning app roles of Microsoft Graph, a Microsoft first-party app, needs one of those),
# signed in with `az login` to that tenant (and, for GCC High / DoD, after
# `az cloud set --name AzureUSGovernment`). No Azure subscription role is needed.
# `--check` only reads, and any member of the tenant who can read service principals may run it.
#
# Usage:
#   infra/scripts/grant-graph-permission.sh [--check] [--principal-id <object id>]
#                                            [--app-roles <name,name,...>] [--graph-url <root>]
#
# Defaults come from the environment, which azd fills from the deployment outputs (run the script
# from the project folder after `azd up`, or `eval "$(azd env get-values)"` first):
#   AZURE_MANAGED_IDENTITY_PRINCIPAL_ID   --principal-id   object id of the managed identity
#   GRAPH_APP_ROLES                       --app-roles      permissions the deployment asked for
#   GRAPH_BASE_URL                        --graph-url      Microsoft Graph root of the tenant cloud
# Without GRAPH_APP_ROLES the Bicep defaults are used:
#   TeamsAppInstallation.ReadWriteForUser.All, GroupMember.Read.All and AppCatalog.Read.All.
#
# Exit status: 0 all granted (or nothing missing with --check), 1 usage or Graph error,
# 2 (--check only) some permission is missing.
set -euo pipefail

readonly MICROSOFT_GRAPH_APP_ID="00000003-0000-0000-c000-000000000000"
readonly DEFAULT_APP_ROLES="TeamsAppInstallation.ReadWriteForUser.All,GroupMember.Read.All,AppCatalog.Read.All"

# Microsoft Graph app role ids (the same in every tenant); keep equal to graphAppRoleIds in
# infra/graph-permission.bicep (tests/test_infra.py compares them).
app_role_id() {
  case "$1" in
    TeamsAppInstallation.ReadWriteForUser.All) echo 74ef0291-ca83-4d02-8c7e-d2391e6a444f ;;
    TeamsAppInstallation.ReadWriteAndConsentForUser.All) echo 32ca478f-f89e-41d0-aaf8-101deb7da510 ;;
    TeamsAppInstallation.ReadWriteForTeam.All) echo 5dad17ba-f6cc-4954-a5a2-a0dcc95154f0 ;;
    TeamsAppInstallation.ReadWriteAndConsentForTeam.All) echo b0c13be0-8e20-4bc5-8c55-963c23a39ce9 ;;
    TeamsAppInstallation.ReadWriteForChat.All) echo 9e19bae1-2623-4c4f-ab6e-2664615ff9a0 ;;
    TeamsAppInstallation.ReadWriteAndConsentForChat.All) echo 6e74eff9-4a21-45d6-bc03-3a20f61f8281 ;;
    GroupMember.Read.All) echo 98830695-27a2-44f7-8c18-0c3ebc9698f6 ;;
    AppCatalog.Read.All) echo e12dae10-5a57-4817-b79d-dfbec5348930 ;;
    *) return 1 ;;
  esac
}

die() {
  echo "grant-graph-permission: $*" >&2
  exit 1
}

usage() {
  # The comment block at the top of this file.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

# Values from `azd env get-value` when the variable is not exported and azd is at hand.
from_azd() {
  if command -v azd >/dev/null 2>&1; then
    azd env get-value "$1" 2>/dev/null || true
  fi
}

check_only=false
principal_id="${AZURE_MANAGED_IDENTITY_PRINCIPAL_ID:-}"
app_roles="${GRAPH_APP_ROLES:-}"
graph_url="${GRAPH_BASE_URL:-}"

while [ $# -gt 0 ]; do
  case "$1" in
    --check) check_only=true ;;
    --principal-id) principal_id="${2:?--principal-id needs a value}"; shift ;;
    --app-roles) app_roles="${2:?--app-roles needs a value}"; shift ;;
    --graph-url) graph_url="${2:?--graph-url needs a value}"; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

[ -n "$principal_id" ] || principal_id="$(from_azd AZURE_MANAGED_IDENTITY_PRINCIPAL_ID)"
[ -n "$app_roles" ] || app_roles="$(from_azd GRAPH_APP_ROLES)"
[ -n "$graph_url" ] || graph_url="$(from_azd GRAPH_BASE_URL)"
[ -n "$app_roles" ] || app_roles="$DEFAULT_APP_ROLES"
app_roles="${app_roles// /}"
[ -n "$graph_url" ] || graph_url="https://graph.microsoft.com"
graph_url="${graph_url%/}"

guid_pattern='^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'
[ -n "$principal_id" ] || die "no managed identity: pass --principal-id or set AZURE_MANAGED_IDENTITY_PRINCIPAL_ID (an output of azd up)"
[[ "$principal_id" =~ $guid_pattern ]] || die "--principal-id '$principal_id' is not an object id (GUID)"
case "$graph_url" in
  https://graph.microsoft.com | https://graph.microsoft.us | https://dod-graph.microsoft.us) ;;
  *) die "--graph-url '$graph_url' is not a Microsoft Graph root this deployment supports" ;;
esac

IFS=',' read -r -a roles <<<"$app_roles"
for role in "${roles[@]}"; do
  app_role_id "$role" >/dev/null || die "unknown permission '$role' (known: see app_role_id in $0)"
done

command -v az >/dev/null 2>&1 || die "Azure CLI (az) not found"
az account show --only-show-errors >/dev/null 2>&1 || die "not signed in: run az login (to the tenant of the deployment)"

graph() {
  az rest --only-show-errors --resource "$graph_url" "$@"
}

# The Microsoft Graph service principal of this tenant, and a check that each role id in the
# table above is what this tenant's Microsoft Graph calls it (catches a stale table or cloud).
graph_sp_id="$(graph --method get \
  --url "$graph_url/v1.0/servicePrincipals(appId='$MICROSOFT_GRAPH_APP_ID')?\$select=id" \
  --query id --output tsv)" || die "cannot read the Microsoft Graph service principal"
for role in "${roles[@]}"; do
  expected="$(app_role_id "$role")"
  actual="$(graph --method get \
    --url "$graph_url/v1.0/servicePrincipals/$graph_sp_id?\$select=appRoles" \
    --query "appRoles[?value=='$role'].id | [0]" --output tsv)" || die "cannot read the app roles of Microsoft Graph"
  [ "$actual" = "$expected" ] || die "Microsoft Graph in this tenant names $role '$actual', the table says '$expected'"
done

# Roles the identity already holds on Microsoft Graph. A managed identity created a moment ago
# may take a little while to appear in Microsoft Graph, hence the retries.
existing=""
for attempt in 1 2 3 4 5 6; do
  if existing="$(graph --method get \
    --url "$graph_url/v1.0/servicePrincipals/$principal_id/appRoleAssignments" \
    --query "value[?resourceId=='$graph_sp_id'].appRoleId" --output tsv 2>/dev/null)"; then
    break
  fi
  [ "$attempt" -lt 6 ] || die "cannot read the app roles of managed identity $principal_id (wrong tenant, or no right to read service principals?)"
  echo "managed identity not visible in Microsoft Graph yet; retrying in 10 s" >&2
  sleep 10
done

missing=0
for role in "${roles[@]}"; do
  id="$(app_role_id "$role")"
  if printf '%s\n' "$existing" | grep -qix "$id"; then
    echo "granted   $role"
  elif [ "$check_only" = true ]; then
    echo "MISSING   $role"
    missing=$((missing + 1))
  else
    graph --method post \
      --url "$graph_url/v1.0/servicePrincipals/$principal_id/appRoleAssignments" \
      --headers "Content-Type=application/json" \
      --body "{\"principalId\": \"$principal_id\", \"resourceId\": \"$graph_sp_id\", \"appRoleId\": \"$id\"}" \
      --output none || die "granting $role failed: are you a Privileged Role Administrator of this tenant?"
    echo "GRANTED   $role"
  fi
done

if [ "$missing" -gt 0 ]; then
  cat >&2 <<EOF

$missing Microsoft Graph permission(s) of managed identity $principal_id are missing: the function
will get 403 from Graph until they are granted. A Privileged Role Administrator or Global
Administrator of the tenant runs, from this project folder:

  az login --tenant <tenant id>
  infra/scripts/grant-graph-permission.sh --principal-id $principal_id --app-roles $app_roles

EOF
  exit 2
fi
