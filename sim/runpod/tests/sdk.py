"""RunPod's official Python SDK against runpod-sim, exactly as it is used against RunPod.

Run with RUNPOD_API_BASE_URL and RUNPOD_API_KEY set; prints one JSON line of observations.
"""
import json
import os
import sys
import time

import runpod

runpod.api_key = os.environ["RUNPOD_API_KEY"]
volume = os.environ["SIM_VOLUME_ID"]
out = {}

gpus = runpod.get_gpus()
out["gpu_ids"] = sorted(g["id"] for g in gpus)
gpu = runpod.get_gpu("NVIDIA RTX PRO 4500 Blackwell")
out["gpu_price"] = gpu["lowestPrice"]["uninterruptablePrice"]
try:
    runpod.get_gpu("NVIDIA GeForce GTX 9999")
    out["unknown_gpu"] = "accepted"
except ValueError as e:
    out["unknown_gpu"] = str(e)

pod = runpod.create_pod(
    "sdk-pod",
    "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404",
    "NVIDIA RTX PRO 4500 Blackwell",
    cloud_type="SECURE",
    network_volume_id=volume,  # the SDK looks up the volume's data center itself
    volume_mount_path="/workspace",
    env={"EP_RUN_ID": "r-sdk", "QUOTE": "it's"},
    docker_args="sh -c 'echo from-pod > /workspace/sdk-proof.txt; sleep 60'",
    ports="22/tcp",
)
out["created"] = pod
pod_id = pod["id"]
out["get_immediately"] = runpod.get_pod(pod_id)
deadline = time.time() + 20
while time.time() < deadline:
    p = runpod.get_pod(pod_id)
    if p["runtime"] and p["runtime"]["ports"]:
        break
    time.sleep(0.2)
out["get_running"] = p
out["listed_ids"] = [p["id"] for p in runpod.get_pods()]
out["stopped"] = runpod.stop_pod(pod_id)
out["after_stop"] = runpod.get_pod(pod_id)
out["resumed"] = runpod.resume_pod(pod_id, 1)
runpod.terminate_pod(pod_id)
out["after_terminate"] = runpod.get_pod(pod_id)
out["listed_after_terminate"] = [p["id"] for p in runpod.get_pods()]
try:
    runpod.terminate_pod(pod_id)
    out["second_terminate"] = "ok"
except runpod.error.QueryError as e:
    out["second_terminate"] = str(e)
runpod.api_key = "rpa_wrong"
try:
    runpod.get_pods()
    out["bad_key"] = "accepted"
except runpod.error.AuthenticationError as e:
    out["bad_key"] = str(e)
print(json.dumps(out))
