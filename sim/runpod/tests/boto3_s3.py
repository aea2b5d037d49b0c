"""boto3 against runpod-sim's network-volume S3: put, head, get, list, as RunPod's docs show it."""
import json
import os

import boto3
from botocore.config import Config

s3 = boto3.client(
    "s3",
    endpoint_url=os.environ["SIM_S3"],
    aws_access_key_id=os.environ["SIM_S3_KEY"],
    aws_secret_access_key=os.environ["SIM_S3_SECRET"],
    region_name="EU-RO-1",  # the data center id, as RunPod's documentation configures it
    config=Config(s3={"addressing_style": "path"}),
)
bucket = os.environ["SIM_VOLUME_ID"]
out = {}
out["buckets"] = [b["Name"] for b in s3.list_buckets()["Buckets"]]
put = s3.put_object(Bucket=bucket, Key="boto/hello.txt", Body=b"hello from boto3", Metadata={"sha256": "abc"})
out["put_etag"] = put["ETag"]
head = s3.head_object(Bucket=bucket, Key="boto/hello.txt")
out["head"] = {"size": head["ContentLength"], "etag": head["ETag"], "meta": head["Metadata"]}
out["get"] = s3.get_object(Bucket=bucket, Key="boto/hello.txt")["Body"].read().decode()
s3.put_object(Bucket=bucket, Key="boto/empty-dir/", Body=b"")
out["list"] = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="boto/").get("Contents", [])]
out["pod_file_head"] = s3.head_object(Bucket=bucket, Key="sdk-proof.txt")["ContentLength"] if os.environ.get("POD_FILE") else None
try:
    s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "boto/hello.txt"}]})
    out["delete_objects"] = "accepted"
except s3.exceptions.ClientError as e:
    out["delete_objects"] = e.response["Error"]["Code"]
s3.delete_object(Bucket=bucket, Key="boto/hello.txt")
try:
    s3.head_object(Bucket=bucket, Key="boto/hello.txt")
    out["after_delete"] = "present"
except s3.exceptions.ClientError as e:
    out["after_delete"] = e.response["Error"]["Code"]
print(json.dumps(out))
