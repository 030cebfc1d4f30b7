# For Packer 1.7 and newer only: Packer 1.6.6 (Debian's) refuses this block, so it
# lives outside the templates' directory and is read only by `packer init`:
#
#   packer init appliance/plugins/
#
# installs the two plugins the templates use; `packer build` then finds them.
# (Packer 1.10+ no longer bundles the amazon and ansible plugins.)

packer {
  required_version = ">= 1.7.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.3.0, < 2.0.0"
    }
    ansible = {
      source  = "github.com/hashicorp/ansible"
      version = ">= 1.1.0, < 2.0.0"
    }
  }
}
