"""Row-sharded Engram tables on ``torch.distributed`` (launch with ``torchrun`` or ``accelerate launch``).

``EngramMoEForCausalLM.from_pretrained(path, engram_shard=True, engram_offload=None|"cpu"|"disk")``
gives every rank a contiguous range of every table's rows (``RowSharding``) on its tier; lookups
exchange ids and rows with all-to-all (``ShardedTable``), row gradients return to their owners, and
``build_optimizer`` updates each rank's shard and its optimizer state locally. The dense backbone
composes with data parallelism (wrap it in ``DistributedDataParallel``; the tables are no
parameters, so DDP never touches them). ``save_pretrained`` called on every rank writes a standard
safetensors checkpoint without gathering a table on any rank (``save_sharded_pretrained``).
"""

from .checkpoint import save_sharded_pretrained
from .exchange import SENT_BYTES, reset_counters
from .sharding import RowSharding
from .table import ShardedTable

__all__ = ["RowSharding", "ShardedTable", "save_sharded_pretrained", "SENT_BYTES", "reset_counters"]
