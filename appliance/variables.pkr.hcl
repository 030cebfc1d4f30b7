# Variables shared by stream-agent.pkr.hcl and stream-manager.pkr.hcl.
# Packer reads every *.pkr.hcl in this directory: build one image with -only.

variable "wheels" {
  type        = string
  description = "Directory holding the streamboss wheel (pip wheel --no-deps -w dist .); with offline = true, also every dependency's wheel (pip wheel -w dist .)."
}

variable "offline" {
  type        = bool
  default     = false
  description = "Install streamboss from the wheels directory alone (no package index): for builders without internet access."
}

variable "version" {
  type        = string
  default     = "dev"
  description = "Version recorded in the AMI's streamboss:version tag and the manifest."
}

variable "region" {
  type        = string
  default     = "eu-west-1"
  description = "AWS region the image is built and registered in."
}

variable "instance_type" {
  type        = string
  default     = "t3.small"
  description = "Instance type of the temporary build instance."
}

variable "base_ami_name" {
  type        = string
  default     = "debian-12-amd64-*"
  description = "Name filter for the base image; the newest match is used. Ubuntu 24.04: ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*."
}

variable "base_ami_owners" {
  type        = list(string)
  default     = ["136693071363"]
  description = "Accounts that publish the base image: 136693071363 is Debian, 099720109477 is Canonical."
}

variable "ssh_username" {
  type        = string
  default     = "admin"
  description = "The base image's login user (admin on Debian, ubuntu on Ubuntu)."
}

variable "root_device_name" {
  type        = string
  default     = "/dev/xvda"
  description = "The base image's root device (/dev/xvda on Debian, /dev/sda1 on Ubuntu)."
}

variable "root_volume_gb" {
  type        = number
  default     = 8
  description = "Size of the image's root volume in GiB."
}

variable "kms_key_id" {
  type        = string
  default     = ""
  description = "KMS key that encrypts the image's volumes; empty: the account's default EBS key."
}

variable "subnet_id" {
  type        = string
  default     = ""
  description = "Subnet of the build instance; empty: the default VPC."
}

variable "associate_public_ip_address" {
  type        = bool
  default     = true
  description = "Give the build instance a public address (false when Packer reaches it privately)."
}

variable "ssh_source_cidrs" {
  type        = list(string)
  default     = ["0.0.0.0/0"]
  description = "Addresses allowed to SSH to the build instance (its temporary security group); narrow this to the builder's address."
}

variable "python" {
  type        = string
  default     = "python3"
  description = "A Python with boto3 (the project's virtualenv), which requires IMDSv2 on the build instance."
}

variable "manifest" {
  type        = string
  default     = ""
  description = "Where the manifest post-processor writes; empty: manifest.json next to the templates."
}

variable "ansible_extra_arguments" {
  type        = list(string)
  default     = []
  description = "More ansible-playbook arguments, e.g. [\"--extra-vars\", \"@vars.json\"]."
}

# Only for local builds against a stand-in EC2 (moto); keep empty for AWS.
variable "ec2_endpoint" {
  type        = string
  default     = ""
  description = "EC2 endpoint URL instead of AWS's (a local moto server); empty: AWS."
}

variable "ssh_host" {
  type        = string
  default     = ""
  description = "Address Packer and Ansible SSH to instead of the instance's; empty: the instance's."
}

variable "ssh_port" {
  type        = number
  default     = 22
  description = "SSH port of the build instance."
}

variable "ssh_private_key_file" {
  type        = string
  default     = ""
  description = "SSH key to log in with instead of a temporary key pair; empty: a temporary key pair."
}

locals {
  timestamp = formatdate("YYYYMMDDhhmmss", timestamp())
  manifest  = var.manifest != "" ? var.manifest : "${path.root}/manifest.json"
  # The IMDSv2 step talks to the same EC2 endpoint as the builder.
  endpoint_argument = var.ec2_endpoint != "" ? "--endpoint-url ${var.ec2_endpoint}" : ""
  common_tags = {
    "streamboss:version" = var.version
    "streamboss:built"   = local.timestamp
    "managed-by"         = "packer"
  }
  ansible_env_vars = [
    "ANSIBLE_CONFIG=${path.root}/../ansible/ansible.cfg",
    "ANSIBLE_HOST_KEY_CHECKING=False",
    "ANSIBLE_NOCOLOR=1",
  ]
}
