# The stream-agent image: the base image plus the common and stream_agent roles.
# The agent's unit is installed but not enabled: the Pulumi program's user data
# writes /etc/streamboss/agent.json and agent.env and starts it.

source "amazon-ebs" "stream-agent" {
  region          = var.region
  instance_type   = var.instance_type
  ami_name        = "streamboss-stream-agent-${var.version}-${local.timestamp}"
  ami_description = "streamboss stream agent ${var.version}"

  source_ami_filter {
    filters = {
      name                = var.base_ami_name
      architecture        = "x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = var.base_ami_owners
    most_recent = true
  }

  # Encrypted root volume on the build instance and in the registered image.
  encrypt_boot = true
  kms_key_id   = var.kms_key_id
  launch_block_device_mappings {
    device_name           = var.root_device_name
    volume_size           = var.root_volume_gb
    volume_type           = "gp3"
    iops                  = 3000
    throughput            = 125
    encrypted             = true
    kms_key_id            = var.kms_key_id
    delete_on_termination = true
  }
  ena_support = true

  subnet_id                             = var.subnet_id
  associate_public_ip_address           = var.associate_public_ip_address
  temporary_security_group_source_cidrs = var.ssh_source_cidrs
  ssh_username                          = var.ssh_username
  ssh_host                              = var.ssh_host
  ssh_port                              = var.ssh_port
  ssh_private_key_file                  = var.ssh_private_key_file
  ssh_timeout                           = "10m"

  custom_endpoint_ec2     = var.ec2_endpoint
  skip_metadata_api_check = var.ec2_endpoint != ""

  # infra/launch.py finds the newest image with streamboss:role = stream-agent.
  tags = merge(local.common_tags, {
    "Name"            = "streamboss-stream-agent-${var.version}"
    "streamboss:role" = "stream-agent"
  })
  snapshot_tags = merge(local.common_tags, {
    "streamboss:role" = "stream-agent"
  })
  run_tags = {
    "Name"            = "packer-streamboss-stream-agent"
    "streamboss:role" = "packer-build"
  }
}

build {
  sources = ["source.amazon-ebs.stream-agent"]

  # IMDSv2 on the build instance before anything runs on it. Packer 1.6.6's
  # amazon-ebs has no metadata_options (1.7 added it), so ask the EC2 API directly.
  provisioner "shell-local" {
    inline = ["${var.python} ${path.root}/scripts/require-imdsv2.py --region ${var.region} --instance-id ${build.ID} ${local.endpoint_argument}"]
  }

  # The same playbook and roles that maintain running nodes.
  provisioner "ansible" {
    playbook_file    = "${path.root}/../ansible/site.yml"
    groups           = ["stream_agents"]
    user             = var.ssh_username
    use_proxy        = false
    ansible_env_vars = local.ansible_env_vars
    extra_arguments = concat([
      "--extra-vars", jsonencode({
        stream_agent_wheels        = abspath(var.wheels)
        stream_agent_offline       = var.offline
        ansible_python_interpreter = "/usr/bin/python3"
      }),
    ], var.ansible_extra_arguments)
  }

  post-processor "manifest" {
    output     = local.manifest
    strip_path = true
    custom_data = {
      role    = "stream-agent"
      version = var.version
    }
  }
}
