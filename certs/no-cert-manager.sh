#!/usr/bin/env bash
# Without cert-manager: make a CA and serving certificates with openssl: the webhook's
# (vmdisk-webhook-tls, its CA put into the MutatingWebhookConfiguration) and the controller's
# agent API's (vmdisk-controller-tls, its CA given to the agents as vmdisk-agent-trust).
# Usage: certs/no-cert-manager.sh   (after `kubectl apply -f deploy/<files>` without ../certs)
# Re-run before the certificate expires (825 days); the webhook reloads the Secret by itself.
set -euo pipefail
ns=vmdisk-system
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
  -subj "/CN=vmdisk-ca" -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
issue() { # issue SERVICE SECRET
  local svc=$1 secret=$2
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=$svc.$ns.svc" -keyout "$dir/$svc.key" -out "$dir/$svc.csr" 2>/dev/null
  printf 'subjectAltName=DNS:%s.%s.svc,DNS:%s.%s.svc.cluster.local\n' "$svc" "$ns" "$svc" "$ns" > "$dir/$svc.ext"
  openssl x509 -req -in "$dir/$svc.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 825 -extfile "$dir/$svc.ext" -out "$dir/$svc.crt" 2>/dev/null
  kubectl -n "$ns" create secret tls "$secret" --cert="$dir/$svc.crt" --key="$dir/$svc.key" \
    --dry-run=client -o yaml | kubectl apply -f -
}
issue vmdisk-webhook vmdisk-webhook-tls
issue vmdisk-controller vmdisk-controller-tls
kubectl -n "$ns" create secret generic vmdisk-agent-trust --from-file=ca.crt="$dir/ca.crt" \
  --dry-run=client -o yaml | kubectl apply -f -
ca=$(base64 -w0 < "$dir/ca.crt")
kubectl patch mutatingwebhookconfiguration vmdisk --type=json -p "[
  {\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$ca\"},
  {\"op\":\"add\",\"path\":\"/webhooks/1/clientConfig/caBundle\",\"value\":\"$ca\"}]"
echo "vmdisk webhook and agent API certificates installed (expire in 825 days)"
