"""A model's profile before it runs: parameters per component, FLOPs per
token, and the memory training takes (weights, gradients, Adam's moments,
activations at the configured batch and context, the kernel's scratch,
SQLite's cache of a checkpoint and the Python runtime), read off the tensor
table and the activation shapes."""
from math import prod

from .arch import tensor_table
from .model import activation_shapes

FLOAT = 4                   # bytes
RUNTIME_MB = 45             # Python with numpy, sqlite, click and tokenizers loaded
COMPONENTS = {  # component -> group it is reported under
    "wte": "embeddings", "wpe": "embeddings", "head": "head", "lnf_w": "norms", "lnf_b": "norms",
    "ln1_w": "norms", "ln1_b": "norms", "ln2_w": "norms", "ln2_b": "norms",
    "q": "attention", "k": "attention", "v": "attention", "proj": "attention",
    "q_b": "attention", "k_b": "attention", "v_b": "attention", "proj_b": "attention",
    "gate": "mlp", "fc1": "mlp", "fc2": "mlp", "gate_b": "mlp", "fc1_b": "mlp", "fc2_b": "mlp",
    "cls_w": "classifier", "cls_b": "classifier",
}


def model_profile(arch, batch_size, checkpoint_activations=False):
    """{parameters: {group: count, total}, flops_per_token: {forward,
    training}, memory_mb: {weights, gradients, optimizer, activations,
    scratch, database, runtime, total}} for training at batch_size x seq_len.
    With checkpoint_activations the layers keep only their inputs (plus one
    block's buffers) and training runs each block's forward twice."""
    table = tensor_table(arch)
    stored = [s for s in table if s.tied_to is None]
    groups = {}
    for spec in stored:
        group = COMPONENTS[spec.component]
        groups[group] = groups.get(group, 0) + prod(spec.shape)
    total = sum(groups.values())
    # matmul weights (every matrix but the row lookups; the head even when tied)
    matmul = sum(prod(s.shape) for s in table if len(s.shape) == 2 and s.name not in ("wte", "wpe"))
    attention = 2 * arch.num_layers * arch.seq_len * arch.q_dim  # QK^T and AV, causal half
    forward = 2 * matmul + attention
    layer_shapes, shapes = activation_shapes(arch, batch_size, arch.seq_len,
                                             classify=bool(arch.num_labels))
    per_layer = sum(prod(s) for s in layer_shapes.values())
    if checkpoint_activations:
        kept = arch.num_layers * prod(layer_shapes["x"]) + per_layer - prod(layer_shapes["x"])
    else:
        kept = arch.num_layers * per_layer
    acts = kept + sum(prod(s) for s in shapes.values())
    largest = max(prod(s.shape) for s in table if len(s.shape) == 2)
    mb = 1 / 2**20
    memory = {"weights": total * FLOAT * mb, "gradients": total * FLOAT * mb,
              "optimizer": 2 * total * FLOAT * mb, "activations": acts * FLOAT * mb,
              # the matmul packs its largest B operand whole; attention's heads are small
              "scratch": 2 * largest * FLOAT * mb,
              # a checkpoint's rows (data, m, v) stay in SQLite's cache until it commits
              "database": 3 * total * FLOAT * mb, "runtime": RUNTIME_MB}
    memory["total"] = sum(memory.values())
    return {"parameters": {**groups, "total": total},
            "flops_per_token": {"forward": forward,
                                "training": (4 if checkpoint_activations else 3) * forward},
            "memory_mb": {k: round(v, 1) for k, v in memory.items()}}
