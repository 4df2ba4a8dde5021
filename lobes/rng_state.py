"""The global RNG streams (torch CPU/CUDA, numpy, python; per DDP rank) and named DataLoader generators as one
JSON checkpoint file (no pickle): what makes a resumed run draw the same numbers as one that never stopped
(``lobes.checkpointing.AtomicCheckpointer`` saves it with every checkpoint as ``rng_state.ckpt``)."""
import base64
import json
import random

import torch
from speechbrain.utils.distributed import if_main_process


def _b64(tensor):
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text):
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


class RNGState:
    """The global RNG streams (and named loader generators) as one JSON checkpoint file (no pickle)."""

    def __init__(self):
        self.generators = {}  # recoverable name -> torch.Generator owned by that DataLoader

    def capture(self):
        import numpy as np

        np_state = np.random.get_state()
        py_state = random.getstate()
        return {
            "torch": _b64(torch.get_rng_state()),
            # an uninitialised CUDA context has only its seed, which the resumed run sets the same way
            "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else [],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "generators": {k: _b64(g.get_state()) for k, g in self.generators.items()},
        }

    def restore(self, state):
        import numpy as np

        torch.set_rng_state(_unb64(state["torch"]))
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        for name, g_state in state.get("generators", {}).items():
            if name in self.generators:
                self.generators[name].set_state(_unb64(g_state))

    def save(self, path):
        """Called on every rank: each rank's state is kept (ranks may draw differently)."""
        states = [self.capture()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, self.capture())
        if if_main_process():
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"format": "rng-state-v1", "ranks": states}, f)

    def load(self, path, end_of_epoch):
        del end_of_epoch
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        ranks = data["ranks"]
        rank = torch.distributed.get_rank() if (torch.distributed.is_available()
                                                and torch.distributed.is_initialized()) else 0
        self.restore(ranks[rank] if rank < len(ranks) else ranks[0])
