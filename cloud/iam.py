"""The IAM policy a core device's token exchange role needs for edgeloop, and no more.

The runtime component's artifacts and model bundles are read from the component bucket; the
runtime writes its summaries, outlier samples and presence notes under the store prefix. With
``per_device`` (the default), each device may write only keys that carry its own thing name
(``${credentials-iot:ThingName}``, which AWS IoT's credentials provider fills in for Greengrass's
token exchange service), so one compromised device cannot write another's data.
"""

from __future__ import annotations

from edge_runtime.contracts import OUTLIER_PREFIX, SUMMARY_PREFIX

from .components import ComponentError

THING = "${credentials-iot:ThingName}"


def _split_s3(url: str) -> tuple[str, str]:
    if not url.startswith("s3://"):
        raise ComponentError(f"{url!r}: expected s3://bucket[/prefix]")
    bucket, _, prefix = url[5:].partition("/")
    if not bucket:
        raise ComponentError(f"{url!r}: no bucket")
    prefix = prefix.strip("/")
    return bucket, prefix + "/" if prefix else ""


def device_policy(store_url: str, artifact_bucket: str, partition: str = "aws", kms_key_arn: str | None = None,
                  per_device: bool = True) -> dict:
    bucket, prefix = _split_s3(store_url)
    s3 = f"arn:{partition}:s3:::"
    device = THING if per_device else "*"
    written = [f"{s3}{bucket}/{prefix}{SUMMARY_PREFIX}*/device={device}/*",
               f"{s3}{bucket}/{prefix}{OUTLIER_PREFIX}*/device={device}/*",
               f"{s3}{bucket}/{prefix}devices/device={device}/*"]
    statements = [
        {"Sid": "EdgeloopComponentArtifacts", "Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": [f"{s3}{artifact_bucket}/*"]},
        # Get: after a conditional put answers 412, the uploader reads the object to tell a lost
        # answer (same bytes) from a conflict; Abort: a failed multipart upload is cleaned up
        {"Sid": "EdgeloopSync", "Effect": "Allow",
         "Action": ["s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload"], "Resource": written},
        {"Sid": "EdgeloopPresence", "Effect": "Allow", "Action": ["s3:DeleteObject"],
         "Resource": [f"{s3}{bucket}/{prefix}devices/device={device}/writers/*"]},
        {"Sid": "EdgeloopPresenceList", "Effect": "Allow", "Action": ["s3:ListBucket"],
         "Resource": [f"{s3}{bucket}"],
         "Condition": {"StringLike": {"s3:prefix": [f"{prefix}devices/device={device}/*"]}}},
    ]
    if kms_key_arn:
        statements.append({"Sid": "EdgeloopKms", "Effect": "Allow", "Action": ["kms:GenerateDataKey", "kms:Decrypt"],
                           "Resource": [kms_key_arn]})
    return {"Version": "2012-10-17", "Statement": statements}
