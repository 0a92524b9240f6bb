"""The peer `bench.cpu` measures the node against: the script a user would write first.

paho-mqtt 2.x, orjson and ONNX Runtime, inference in paho's `on_message` callback, a result per
window on `imu/{sensor}/motifs` at QoS 1: the same work as the node's (z-score, model, motif
head, the result's fields), none of its guarantees (no validation beyond what numpy refuses, no
acks after the result is safe, no spool, no telemetry, no model updates). Written plainly, as
the docs would lead a user to write it; not tuned.

    python -m bench.peer --broker mqtt://127.0.0.1:1883 --bundle model.tar
"""

import argparse
import json
import struct
import tarfile
import time

import numpy as np
import onnxruntime as ort
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
args.add_argument("--broker", required=True)
args.add_argument("--bundle", required=True)
args.add_argument("--mqtt-protocol", choices=["5", "3.1.1"], default="5")
args.add_argument("--node-id", default="peer")
options = args.parse_args()

with tarfile.open(options.bundle) as bundle:
    manifest = json.load(bundle.extractfile("manifest.json"))
    model = bundle.extractfile("model.onnx").read()
mean = np.asarray(manifest["normalization"]["mean"], dtype=np.float32)
std = np.asarray(manifest["normalization"]["std"], dtype=np.float32)
prototypes = np.asarray(manifest["motif_head"]["prototypes"], dtype=np.float32)
temperature = manifest["motif_head"]["temperature"]
session_options = ort.SessionOptions()
session_options.intra_op_num_threads = 1
session = ort.InferenceSession(model, session_options, providers=["CPUExecutionProvider"])
input_name = session.get_inputs()[0].name
model_ref = {"name": manifest["name"], "version": manifest["version"]}


def on_message(client, userdata, message):
    received = time.time()
    sensor = message.topic.split("/")[1]
    if message.payload[:4] == b"\x89IMU":
        (seq,) = struct.unpack_from("<Q", message.payload, 8)
        x = np.frombuffer(message.payload, dtype="<f4", offset=16).reshape(100, 9)
    else:
        window = orjson.loads(message.payload)
        x = np.asarray(window["x"], dtype=np.float32)
        seq = window.get("seq")
    x = ((x - mean) / std).astype(np.float32)[None]
    latent = session.run(None, {input_name: x})[0][0]
    logits = -((latent[None, :] - prototypes) ** 2).sum(axis=1) / temperature
    scores = np.exp(logits - logits.max())
    scores /= scores.sum()
    result = {
        "schema_version": 1, "sensor_id": sensor, "node_id": options.node_id, "seq": seq,
        "model": model_ref, "latent": latent.tolist(), "motif_scores": scores.tolist(),
        "top_motif": int(scores.argmax()), "latency_ms": (time.time() - received) * 1000,
        "ts": time.time(),
    }  # fmt: skip
    client.publish(f"imu/{sensor}/motifs", orjson.dumps(result), qos=1)


def on_connect(client, userdata, flags, reason_code, properties):
    client.subscribe("imu/+/window", qos=1)


protocol = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}
client = mqtt.Client(
    CallbackAPIVersion.VERSION2, options.node_id, protocol=protocol[options.mqtt_protocol]
)
client.on_connect = on_connect
client.on_message = on_message
host, port = options.broker.removeprefix("mqtt://").rsplit(":", 1)
client.connect(host, int(port))
client.loop_forever()
