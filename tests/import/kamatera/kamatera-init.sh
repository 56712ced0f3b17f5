{% raw %}#!/bin/bash
# Join the RKE2 cluster as an agent (server-init script of the Kamatera example).
set -euo pipefail
mkdir -p /etc/rancher/rke2
cat > /etc/rancher/rke2/config.yaml <<EOC
server: https://10.0.0.10:9345
token: K10c8a6bd2d1d9e1b4a::server:2fe2b6e1a0c5
node-label:
  - kamatera.com/nodegroup=${NODEGROUP:-workers}
EOC
NICS=(eth0 eth1)
echo "configuring ${#NICS[@]} interfaces"
curl -sfL https://get.rke2.io | INSTALL_RKE2_TYPE=agent sh -
systemctl enable --now rke2-agent.service
{% endraw %}