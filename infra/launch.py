"""Launch templates for every node: the image, IMDSv2 required, encrypted volumes.

The manager and every agent pool get their launch template here and nowhere
else, so none can miss a guard: instance metadata only through IMDSv2 session
tokens (a stolen-credential path via SSRF needs a PUT it cannot make), one hop
(nothing the node runs in a container reaches the metadata service), and every
EBS volume encrypted with the account's EBS key.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

# The tag the Packer builds (appliance/) put on their AMIs, and its two values.
ROLE_TAG = "streamboss:role"
MANAGER_ROLE = "stream-manager"
AGENT_ROLE = "stream-agent"
# IMDSv2 answers only a token obtained with a PUT, and its responses do not
# survive an extra network hop.
METADATA_HOP_LIMIT = 1
# gp3: cheaper than gp2 at any size, with baseline IOPS that do not depend on size.
VOLUME_TYPE = "gp3"


def find_image(role: str, image: str | None, owners: Sequence[str],
               parent: pulumi.Resource | None = None) -> pulumi.Output[aws.ec2.GetAmiResult]:
    """Look up the AMI a node boots: ``image`` if given, else the newest one Packer tagged ``role``.

    Parameters:
        role: the ``streamboss:role`` tag value (MANAGER_ROLE or AGENT_ROLE).
        image: an AMI id (``ami-...``), an AMI name (wildcards allowed), or None.
        owners: accounts whose AMIs are considered ("self" for this account).
        parent: the component the lookup belongs to, if any (for its provider).
    """
    if image and image.startswith("ami-"):
        filters = [aws.ec2.GetAmiFilterArgs(name="image-id", values=[image])]
    elif image:
        filters = [aws.ec2.GetAmiFilterArgs(name="name", values=[image])]
    else:
        filters = [aws.ec2.GetAmiFilterArgs(name=f"tag:{ROLE_TAG}", values=[role])]
    return aws.ec2.get_ami_output(most_recent=True, owners=list(owners), filters=filters,
                                  opts=pulumi.InvokeOutputOptions(parent=parent))


@dataclass
class LaunchTemplateArgs:
    """What a node boots.

    Attributes:
        image: the AMI (from :func:`find_image`); its root device is the one encrypted.
        instance_type: the EC2 instance type.
        instance_profile_arn: the node's role, through its instance profile.
        security_group_ids: the node's security groups.
        user_data: the cloud-config text (plain; encoded here).
        root_volume_gb: the root volume's size; None for the image's own size.
        tags: tags for the template and for the instances and volumes it launches.
        metadata_tags: serve the instance's tags in its metadata (agents: their
            lifecycle handler reads its group's name from ``aws:autoscaling:groupName``).
            Every tag key must then avoid ``/`` and spaces, or the launch fails.
    """

    image: pulumi.Output[aws.ec2.GetAmiResult]
    instance_type: pulumi.Input[str]
    instance_profile_arn: pulumi.Input[str]
    security_group_ids: list[pulumi.Input[str]]
    user_data: pulumi.Input[str]
    root_volume_gb: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    metadata_tags: bool = False


def secure_launch_template(name: str, args: LaunchTemplateArgs,
                           parent: pulumi.Resource) -> aws.ec2.LaunchTemplate:
    """A launch template that requires IMDSv2 and encrypts the root volume.

    Parameters:
        name: the template's logical name.
        args: what it launches.
        parent: the component that owns it.
    """
    encoded = pulumi.Output.from_input(args.user_data).apply(
        lambda text: base64.b64encode(text.encode()).decode())
    return aws.ec2.LaunchTemplate(
        name,
        image_id=args.image.id,
        instance_type=args.instance_type,
        iam_instance_profile=aws.ec2.LaunchTemplateIamInstanceProfileArgs(
            arn=args.instance_profile_arn),
        vpc_security_group_ids=args.security_group_ids,
        user_data=encoded,
        metadata_options=aws.ec2.LaunchTemplateMetadataOptionsArgs(
            http_endpoint="enabled", http_tokens="required",
            http_put_response_hop_limit=METADATA_HOP_LIMIT,
            instance_metadata_tags="enabled" if args.metadata_tags else "disabled"),
        block_device_mappings=[aws.ec2.LaunchTemplateBlockDeviceMappingArgs(
            device_name=args.image.root_device_name,
            ebs=aws.ec2.LaunchTemplateBlockDeviceMappingEbsArgs(
                encrypted="true", delete_on_termination="true", volume_type=VOLUME_TYPE,
                volume_size=args.root_volume_gb))],
        tag_specifications=[
            aws.ec2.LaunchTemplateTagSpecificationArgs(resource_type=kind, tags=args.tags)
            for kind in ("instance", "volume")],
        # New versions become the default, so a changed definition reaches new instances.
        update_default_version=True,
        tags=args.tags,
        opts=pulumi.ResourceOptions(parent=parent),
    )


def latest(template: aws.ec2.LaunchTemplate) -> dict[str, pulumi.Input[str]]:
    """A reference to ``template``'s latest version, for a group or an instance.

    Naming the version (not ``$Latest``) makes a changed template a visible
    change of its user, which is what rolls the change out.
    """
    return {"id": template.id, "version": template.latest_version.apply(str)}
