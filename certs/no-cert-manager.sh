#!/usr/bin/env bash
# Without cert-manager: make a CA and serving certificates with openssl: the webhook's
# (vmdisk-webhook-tls, its CA put into the MutatingWebhookConfiguration) and the controller's
# agent API's (vmdisk-controller-tls, its CA given to the agents as vmdisk-agent-trust), and the
# one the cache agents serve their peers with (vmdisk-peer-tls, with the CA beside it).
# Usage: certs/no-cert-manager.sh   (after `kubectl apply -f deploy/<files>` without ../certs)
# Re-run before the certificate expires (825 days); the webhook reloads the Secret by itself.
set -euo pipefail
ns=vmdisk-system
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
  -subj "/CN=vmdisk-ca" -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
issue() { # issue SERVICE SECRET [with-ca]: with-ca puts the CA into the Secret too (ca.crt)
  local svc=$1 secret=$2 with=${3:-}
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=$svc.$ns.svc" -keyout "$dir/$svc.key" -out "$dir/$svc.csr" 2>/dev/null
  printf 'subjectAltName=DNS:%s.%s.svc,DNS:%s.%s.svc.cluster.local\n' "$svc" "$ns" "$svc" "$ns" > "$dir/$svc.ext"
  openssl x509 -req -in "$dir/$svc.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 825 -extfile "$dir/$svc.ext" -out "$dir/$svc.crt" 2>/dev/null
  if [ "$with" = with-ca ]; then
    kubectl -n "$ns" create secret generic "$secret" --from-file=tls.crt="$dir/$svc.crt" \
      --from-file=tls.key="$dir/$svc.key" --from-file=ca.crt="$dir/ca.crt" \
      --dry-run=client -o yaml | kubectl apply -f -
  else
    kubectl -n "$ns" create secret tls "$secret" --cert="$dir/$svc.crt" --key="$dir/$svc.key" \
      --dry-run=client -o yaml | kubectl apply -f -
  fi
}
issue vmdisk-webhook vmdisk-webhook-tls
issue vmdisk-controller vmdisk-controller-tls
kubectl -n "$ns" create secret generic vmdisk-agent-trust --from-file=ca.crt="$dir/ca.crt" \
  --dry-run=client -o yaml | kubectl apply -f -
issue vmdisk-peer vmdisk-peer-tls with-ca
ca=$(base64 -w0 < "$dir/ca.crt")
kubectl patch mutatingwebhookconfiguration vmdisk --type=json -p "[
  {\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$ca\"},
  {\"op\":\"add\",\"path\":\"/webhooks/1/clientConfig/caBundle\",\"value\":\"$ca\"}]"
echo "vmdisk webhook, agent API and peer certificates installed (expire in 825 days)"
