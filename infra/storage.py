"""Storage: the archive and objects buckets, private, encrypted, TLS only.

Every bucket is made by :class:`PrivateBucket`, so none can miss a guard: all
four public-access-block flags, ACLs disabled (the bucket owner owns every
object), default encryption at rest, and a policy that denies any request not
made over TLS. The archive bucket adds versioning and a lifecycle rule, since
its segments are the only durable copy of a stream's past.

Key layout in the objects bucket (``s3://<objects>/...``): agents store large
outputs under ``operations/<operation>/`` and ``streamboss stream-file`` uploads
go under ``streams/<stream>/`` when given ``--store s3://<objects>/streams``.
The agents' IAM policies are scoped to those prefixes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

# Agents get s3://<objects>/operations as their object store; see the module docstring.
OPERATIONS_PREFIX = "operations"
STREAMS_PREFIX = "streams"
# SSE-S3: encryption at rest with no key policy to keep and no kms:Decrypt to
# grant, which keeps the node roles to S3 actions alone.
SSE_ALGORITHM = "AES256"
# Multipart uploads a crashed agent or archiver leaves behind are billed until
# aborted; a week is long past any live upload.
ABORT_INCOMPLETE_UPLOAD_DAYS = 7


def tls_only_policy(bucket_arn: str) -> str:
    """A bucket policy denying every request made without TLS (aws:SecureTransport false)."""
    return json.dumps({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "DenyInsecureTransport",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "s3:*",
            "Resource": [bucket_arn, f"{bucket_arn}/*"],
            "Condition": {"Bool": {"aws:SecureTransport": "false"}},
        }],
    }, sort_keys=True)


@dataclass
class PrivateBucketArgs:
    """A private bucket's options.

    Attributes:
        versioned: keep every version of every object.
        lifecycle_rules: S3 lifecycle rules (BucketLifecycleConfiguration rule args).
        tags: tags for every resource.
    """

    versioned: bool = False
    lifecycle_rules: list[aws.s3.BucketLifecycleConfigurationRuleArgs] = field(
        default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)


class PrivateBucket(pulumi.ComponentResource):
    """An S3 bucket nobody outside the account can read, encrypted, reachable over TLS only.

    Outputs:
        bucket: the bucket's name.
        arn: its ARN.
    """

    bucket: pulumi.Output[str]
    arn: pulumi.Output[str]

    def __init__(self, name: str, args: PrivateBucketArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("streamboss:infra:PrivateBucket", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        bucket = aws.s3.Bucket(name, tags=args.tags, opts=child)
        block = aws.s3.BucketPublicAccessBlock(
            f"{name}-public-access", bucket=bucket.id, block_public_acls=True,
            block_public_policy=True, ignore_public_acls=True, restrict_public_buckets=True,
            opts=child)
        aws.s3.BucketOwnershipControls(
            f"{name}-ownership", bucket=bucket.id,
            rule=aws.s3.BucketOwnershipControlsRuleArgs(object_ownership="BucketOwnerEnforced"),
            opts=child)
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{name}-encryption", bucket=bucket.id,
            rules=[aws.s3.BucketServerSideEncryptionConfigurationRuleArgs(
                apply_server_side_encryption_by_default=aws.s3
                .BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultArgs(
                    sse_algorithm=SSE_ALGORITHM))],
            opts=child)
        # After the public access block: S3 checks a new policy against it.
        aws.s3.BucketPolicy(f"{name}-tls-only", bucket=bucket.id,
                            policy=bucket.arn.apply(tls_only_policy),
                            opts=pulumi.ResourceOptions(parent=self, depends_on=[block]))
        versioning = None
        if args.versioned:
            versioning = aws.s3.BucketVersioning(
                f"{name}-versioning", bucket=bucket.id,
                versioning_configuration=aws.s3.BucketVersioningVersioningConfigurationArgs(
                    status="Enabled"),
                opts=child)
        rules = [*args.lifecycle_rules, aws.s3.BucketLifecycleConfigurationRuleArgs(
            id="abort-incomplete-uploads", status="Enabled",
            filter=aws.s3.BucketLifecycleConfigurationRuleFilterArgs(prefix=""),
            abort_incomplete_multipart_upload=aws.s3
            .BucketLifecycleConfigurationRuleAbortIncompleteMultipartUploadArgs(
                days_after_initiation=ABORT_INCOMPLETE_UPLOAD_DAYS))]
        aws.s3.BucketLifecycleConfiguration(
            f"{name}-lifecycle", bucket=bucket.id, rules=rules,
            # Noncurrent-version rules need versioning switched on first.
            opts=pulumi.ResourceOptions(parent=self,
                                        depends_on=[versioning] if versioning else []))
        self.bucket = bucket.bucket
        self.arn = bucket.arn
        self.register_outputs({"bucket": self.bucket, "arn": self.arn})


@dataclass
class StorageArgs:
    """Lifecycle settings for the two buckets.

    Attributes:
        archive_transition_days: days before archive segments move to ``archive_storage_class``.
        archive_storage_class: the cheaper class they move to.
        archive_noncurrent_expiration_days: days an overwritten segment version is kept.
        objects_expiration_days: days before objects expire; 0 keeps them.
        tags: tags for every resource.
    """

    archive_transition_days: int
    archive_storage_class: str
    archive_noncurrent_expiration_days: int
    objects_expiration_days: int = 0
    tags: dict[str, str] = field(default_factory=dict)


class Storage(pulumi.ComponentResource):
    """The archive bucket (stream segments) and the objects bucket (claim-check objects).

    Outputs:
        archive: the archive :class:`PrivateBucket`.
        objects: the objects :class:`PrivateBucket`.
    """

    archive: PrivateBucket
    objects: PrivateBucket

    def __init__(self, name: str, args: StorageArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("streamboss:infra:Storage", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        everything = aws.s3.BucketLifecycleConfigurationRuleFilterArgs(prefix="")
        archive_rule = aws.s3.BucketLifecycleConfigurationRuleArgs(
            id="archive-tiering", status="Enabled", filter=everything,
            transitions=[aws.s3.BucketLifecycleConfigurationRuleTransitionArgs(
                days=args.archive_transition_days, storage_class=args.archive_storage_class)],
            noncurrent_version_expiration=aws.s3
            .BucketLifecycleConfigurationRuleNoncurrentVersionExpirationArgs(
                noncurrent_days=args.archive_noncurrent_expiration_days))
        self.archive = PrivateBucket(
            f"{name}-archive",
            PrivateBucketArgs(versioned=True, lifecycle_rules=[archive_rule], tags=args.tags),
            opts=child)
        object_rules = []
        if args.objects_expiration_days:
            object_rules.append(aws.s3.BucketLifecycleConfigurationRuleArgs(
                id="objects-expiry", status="Enabled", filter=everything,
                expiration=aws.s3.BucketLifecycleConfigurationRuleExpirationArgs(
                    days=args.objects_expiration_days)))
        self.objects = PrivateBucket(
            f"{name}-objects", PrivateBucketArgs(lifecycle_rules=object_rules, tags=args.tags),
            opts=child)
        self.register_outputs({"archive": self.archive.bucket, "objects": self.objects.bucket})
