import os

# Credentials come from the pxe-credentials ConfigMap when it is mounted as env.
try:
    pxe_host = os.environ["PXE_HOST"]
    pxe_user = os.environ["PXE_USER"]
    pxe_password = os.environ["PXE_PASSWORD"]
except KeyError:
    pxe_host = "10.10.10.10"
    pxe_user = "root@pam"
    pxe_password = "t3mplat3"

pxe_autoscaled_node_template_vm = "autoscaler.tmpl"  # preconfigured template vm for autoscaler
pxe_autoscaled_node_name = "autoscaler.node"  # autoscaled vm names in pxe (node-01, node-02 ...)
pxe_autoscaled_node_network_mode = 'manual'  # manual or dhcp
pxe_autoscaled_node_ip_pool = '10.10.10.11-10.10.10.19'  # ip range for manual network mode
pxe_autoscaled_node_ip_mask = '24'  # cidr notation network mask
pxe_autoscaled_node_ip_gateway = '10.10.10.1'  # ip gateway for manual network mode
pxe_autoscaled_node_dns_server = '10.10.10.1'  # dns server for manual network mode

node_group_label = 'pxe-autoscaler/autoscaler-managed-node'
min_size = 0
max_size = 5

scan_interval = 15  # secs
max_node_provision_time = 900  # secs TODO
scale_down_unneeded_time = 600  # secs
scale_down_delay = 600  # secs
scale_up_delay_after_add = 300  # secs
scale_down_delay_after_add = 600  # secs
scale_down_delay_after_error = 600  # secs
scale_down_utilization_threshold = 50  # %
max_total_unready_percentage = 45  # TODO
ok_total_unready_count = 3  # TODO
