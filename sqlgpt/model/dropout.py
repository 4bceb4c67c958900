"""Dropout seeds: the 64-bit seed of each dropout site the kernel hashes its
masks from, for the blocks (model.py) and the LoRA adapters (lora.py)."""


# the kernel's dropout mask hashes seed + DROPOUT_STRIDE * (element + 1)
DROPOUT_STRIDE = 0x9E3779B97F4A7C15


def shifted_seed(seed, elements):
    """The seed whose mask over a tensor is seed's mask from element
    `elements` on: an MPI rank's rows get the masks those rows have in the
    whole batch."""
    return (seed + DROPOUT_STRIDE * elements) % 2**64


def dropout_seeds(base_seed, num_layers, first_element=0):
    """Two dropout sites per layer, each with its own 64-bit seed (both
    sites are (rows, embed_dim): first_element is the first row's times
    embed_dim)."""
    return [shifted_seed((base_seed + DROPOUT_STRIDE * (i + 1)) % 2**64, first_element)
            for i in range(2 * num_layers)]
