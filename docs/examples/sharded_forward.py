"""Row-sharded Engram tables on two processes: ``torchrun --nproc-per-node 2 sharded_forward.py CKPT``.

Every rank loads the dense weights and only its own rows of every table (``engram_shard=True``);
a forward exchanges just the rows each rank's tokens need. Rank 0 checks the logits against the
model loaded whole in one process, with the same thread count.
"""

import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import engram_hf  # noqa: F401  (registers the model)

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], engram_shard=True).eval()
ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))
with torch.no_grad():
    logits = model(ids).logits
    if rank == 0:
        whole = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
        same = torch.equal(logits, whole(ids).logits)
        rows = {i: e.table.sharding.local_rows for i, e in model.engram_layers().items()}
        print(f"rank 0 holds {rows} rows per table of {model.engram_table_parameters():,} table values; "
              f"its logits equal one process's: {same}")
        assert same
dist.destroy_process_group()
