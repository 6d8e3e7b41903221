"""Row-wise table optimizers: equal to dense on the first step, sparse in memory, Trainer-ready."""

import pytest
import torch
from transformers import Trainer

from engram_hf.optim import EngramOptimizer, build_optimizer, engram_param_groups, set_sparse_table_grads
from engram_hf.optim.rowwise import optimizer_state_bytes_per_row

from conftest import corpus_blocks as _corpus_blocks
from conftest import cpu_training_args, tiny_model


def _batch():
    return _corpus_blocks()[0]["input_ids"][None]


def _step(model, opt):
    ids = _batch()
    opt.zero_grad()
    model(ids, labels=ids).loss.backward()
    opt.step()


def test_sparse_grad_equals_dense_grad():
    ids = _batch()
    dense, sparse = tiny_model(), tiny_model()
    set_sparse_table_grads(sparse)
    dense(ids, labels=ids).loss.backward()
    sparse(ids, labels=ids).loss.backward()
    for (n, a), (_, b) in zip(dense.named_parameters(), sparse.named_parameters()):
        if b.grad is not None and b.grad.is_sparse:
            assert "table" in n
            torch.testing.assert_close(b.grad.to_dense(), a.grad, rtol=1e-5, atol=1e-7)
        else:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["adam", "adagrad"])
def test_sparse_and_dense_table_gradients_give_same_first_step(mode):
    a, b = tiny_model(), tiny_model()
    opt_a = EngramOptimizer(engram_param_groups(a, 1e-2, table_optimizer=mode), lr=1e-2)  # dense table grads
    opt_b = build_optimizer(b, lr=1e-2, table_optimizer=mode)  # sparse table grads
    _step(a, opt_a)
    _step(b, opt_b)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6, msg=n)


def test_adam_rows_only_touch_used_rows_and_match_torch_adam():
    m = tiny_model()
    opt = build_optimizer(m, lr=1e-2, table_optimizer="adam")
    table = m.model.layers[0].engram.table.weight
    ref_table = table.detach().clone().requires_grad_()
    # Lazy Adam equals Adam on the first step (untouched rows have zero moments and stay put).
    ref = torch.optim.Adam([ref_table], lr=opt.param_groups[-1]["lr"])
    before = table.detach().clone()
    ids = _batch()
    opt.zero_grad()
    m(ids, labels=ids).loss.backward()
    assert table.grad is None, "row-wise tables keep their gradient off .grad (for clip_grad_norm_)"
    (pending,) = table._engram_pending_grads
    assert pending.is_sparse
    ref_table.grad = pending.to_dense()
    touched = pending.coalesce().indices()[0]
    opt.step()
    ref.step()
    changed = (table.detach() != before).any(1)
    assert set(changed.nonzero().squeeze(1).tolist()) <= set(touched.tolist())
    assert changed.sum() > 0
    torch.testing.assert_close(table.detach(), ref_table.detach(), rtol=1e-5, atol=1e-6)


def test_adagrad_rows_state_is_4_bytes_per_row():
    m = tiny_model()
    opt = build_optimizer(m, lr=1e-2, table_optimizer="adagrad")
    _step(m, opt)
    for engram in m.engram_layers().values():
        assert optimizer_state_bytes_per_row(opt, engram.table.weight) == 4.0


def test_dense_group_rejects_sparse_grad():
    m = tiny_model()
    set_sparse_table_grads(m)
    opt = EngramOptimizer(m.parameters(), lr=1e-3)
    ids = _batch()
    m(ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match="row-wise group"):
        opt.step()


def test_gradient_accumulation_sums_micro_batches():
    a, b = tiny_model(), tiny_model()
    opt_a = build_optimizer(a, lr=1e-2, table_optimizer="adagrad")
    opt_b = EngramOptimizer(engram_param_groups(b, 1e-2, table_optimizer="adagrad"), lr=1e-2)
    blocks = _corpus_blocks()
    for model, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        for i in range(2):
            ids = blocks[i]["input_ids"][None]
            model(ids, labels=ids).loss.backward()
        opt.step()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)


def test_unknown_table_optimizer():
    with pytest.raises(ValueError, match="table_optimizer"):
        build_optimizer(tiny_model(), table_optimizer="sgd")


def _trainer(model, tmp_path, steps, **kw):
    args = cpu_training_args(tmp_path, steps, per_device_train_batch_size=4, max_grad_norm=1.0, **kw)
    opt = build_optimizer(model, lr=args.learning_rate, table_optimizer="adagrad")
    return Trainer(model=model, args=args, train_dataset=_corpus_blocks(), optimizers=(opt, None))


def test_trainer_with_rowwise_optimizer_learns_and_resumes_exactly(tmp_path):
    full = _trainer(tiny_model(), tmp_path / "full", 8, save_strategy="no")
    full.train()
    losses = [h["loss"] for h in full.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]

    part = _trainer(tiny_model(), tmp_path / "part", 8, save_strategy="steps", save_steps=4)
    part.train()
    resumed = _trainer(tiny_model(seed=1), tmp_path / "part", 8, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-4"))
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
