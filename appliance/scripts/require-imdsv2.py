#!/usr/bin/env python3
"""Require IMDSv2 on a running instance: Packer's first step on the build instance.

Packer 1.6.6's amazon-ebs builder cannot set metadata options when it launches
(``metadata_options`` came with Packer 1.7), so the template calls this before
anything runs on the instance: only token-authenticated (PUT) metadata requests,
hop limit 1. Uses the same credentials and region as Packer (boto3's chain).

    require-imdsv2.py --region eu-west-1 --instance-id i-0123 [--endpoint-url URL]
"""

from __future__ import annotations

import argparse
import sys
import time

import boto3

# EC2 applies metadata options asynchronously; they take seconds, not minutes.
APPLY_TIMEOUT = 120.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--region", required=True)
    parser.add_argument("--instance-id", required=True)
    parser.add_argument("--endpoint-url", default=None, help="a stand-in EC2 (moto) for tests")
    args = parser.parse_args()
    ec2 = boto3.client("ec2", region_name=args.region, endpoint_url=args.endpoint_url or None)
    ec2.modify_instance_metadata_options(
        InstanceId=args.instance_id, HttpTokens="required", HttpEndpoint="enabled",
        HttpPutResponseHopLimit=1)
    deadline = time.monotonic() + APPLY_TIMEOUT
    while True:
        reservations = ec2.describe_instances(InstanceIds=[args.instance_id])["Reservations"]
        options = reservations[0]["Instances"][0].get("MetadataOptions", {})
        if options.get("State") == "applied" and options.get("HttpTokens") == "required":
            print(f"{args.instance_id}: IMDSv2 required (hop limit "
                  f"{options.get('HttpPutResponseHopLimit')})")
            return 0
        if time.monotonic() > deadline:
            print(f"{args.instance_id}: metadata options not applied after "
                  f"{APPLY_TIMEOUT:g}s: {options}", file=sys.stderr)
            return 1
        time.sleep(2)


if __name__ == "__main__":
    sys.exit(main())
