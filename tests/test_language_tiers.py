"""Tiers 1 and 2 of the lm-* scenarios: a byte-level GPT-2 that cfbench pretrains and caches
(here for a two-step budget in a temporary data root), Hugging Face causal LMs by name or
directory (here one built from a config, offline), the strategies on sequence outputs, and
LoRA on GPT-2's Conv1D projections."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the lm extra: pip install 'cfbench[lm]'")

from cfbench import cli, gpt, registry  # noqa: E402
from cfbench.errors import CfbenchError  # noqa: E402
from cfbench.experiment import execute, plan_runs  # noqa: E402
from cfbench.models import build_model, split_head  # noqa: E402
from cfbench.records import RunRecord  # noqa: E402
from cfbench.strategy import TrainContext, make_strategy  # noqa: E402
from cfbench.train import train_task  # noqa: E402

SMALL = {"train_chars": 1024, "heldout_chars": 256, "span": 256}
TINY = {"iterations": 2, "batch_size": 4}


@pytest.fixture(scope="module")
def tier_root(language_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with the corpora of lm-general-to-code and gcide, and tier 1 pretrained
    for two steps."""
    from cfbench.data.text import fetch_corpus

    fetch_corpus("gcide", language_root)
    root = tmp_path_factory.mktemp("tiers")
    (root / "text").mkdir()
    for corpus in ("fortunes", "python-code", "gcide"):
        (root / "text" / corpus).symlink_to(language_root / "text" / corpus)
    gpt.pretrain_gpt2_gcide(root, steps=2, eval_bytes=256)
    return root


def lm_run(root: Path, strategy: str, lm: str = gpt.TIER1, hparams=None) -> RunRecord:
    (config,) = plan_runs(scenario="lm-general-to-code", settings=["domain"],
                          strategies=[strategy], hparams=hparams or {}, seeds=[0],
                          scenario_options={**SMALL, "lm": lm}, protocol_overrides=TINY,
                          data_root=root)
    record = execute(config, root)
    assert record.status == "ok", record.traceback
    return record


def test_tier1_cache_holds_its_manifest_and_is_verified_at_every_load(tier_root, tmp_path):
    manifest = json.loads((gpt.tier1_dir(tier_root) / gpt.MANIFEST).read_text())
    assert manifest["budget"]["steps"] == 2 and manifest["command"] == gpt.FETCH_COMMAND
    assert manifest["corpus"]["name"] == "gcide" and manifest["config"]["n_positions"] == 64
    model = build_model(gpt.TIER1, (gpt.CONTEXT,), 256)
    gpt.load_pretrained(gpt.TIER1, tier_root, model)
    assert torch.equal(model.head.weight, gpt.pretrained_state(gpt.TIER1, tier_root)["head.weight"])

    with pytest.raises(CfbenchError, match=f"run `{gpt.FETCH_COMMAND} --data-root") as missing:
        gpt.pretrained_state(gpt.TIER1, tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(gpt.tier1_dir(tier_root), gpt.tier1_dir(copy))
    weights = gpt.tier1_dir(copy) / gpt.WEIGHTS
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(raw)
    with pytest.raises(CfbenchError, match="checksum mismatch") as altered:
        gpt.pretrained_state(gpt.TIER1, copy)
    for error in (missing, altered):
        assert "\n" not in str(error.value)


def test_tier1_blocks_are_the_spans_bytes_and_row_one_is_the_pretrained_model(tier_root):
    scenario = registry.scenarios.get("lm-general-to-code").factory(
        data_root=tier_root, seed=0, lm=gpt.TIER1, **SMALL)
    assert scenario.protocol.model == gpt.TIER1 and not scenario.objective.windowed
    for task in scenario.tasks:
        assert task.x_train.shape[1:] == (gpt.CONTEXT,) == task.y_train.shape[1:]
        assert torch.equal(task.x_train[:, 1:], task.y_train[:, :-1])  # shifted by one
        assert task.y_train.numel() == SMALL["train_chars"]
    record = lm_run(tier_root, "naive")
    loss = record.matrices["loss"]
    assert len(record.R) == len(loss) == 3 and all(len(row) == 2 for row in record.R)
    model = build_model(gpt.TIER1, (gpt.CONTEXT,), 256)
    gpt.load_pretrained(gpt.TIER1, tier_root, model)
    source = scenario.tasks[0]
    with torch.no_grad():
        nats = gpt.block_loss(model.eval(), source.x_test.long(), source.y_test)
    assert loss[1][0] == pytest.approx(float(nats), rel=1e-5)
    assert loss[0][0] != pytest.approx(loss[1][0])  # row 0: the untrained model


@pytest.mark.parametrize("strategy", [
    "ewc", "mas", "lwf", "der++", "replay+si", "agem", "l2-sp+layerwise-lr+warmup",
    "online-ewc+freeze", "joint+l2", "lora"])
def test_strategies_train_on_sequence_outputs(tier_root, strategy):
    hparams = {"ewc": {"fisher_samples": 4}, "online-ewc": {"fisher_samples": 4},
               "agem": {"selection": "reservoir", "memory": 8, "per_class": None,
                        "ref_batch_size": 4},
               "replay": {"memory": 8}, "der++": {"memory": 8}}
    record = lm_run(tier_root, strategy,
                    hparams={k: v for k, v in hparams.items() if k in strategy.split("+")})
    assert all(0 <= r <= 1 for row in record.R for r in row)


def test_class_balanced_memory_is_refused_on_sequences(tier_root):
    with pytest.raises(CfbenchError, match="class-balanced"):
        plan_runs(scenario="lm-general-to-code", settings=["domain"], strategies=["agem"],
                  hparams={}, seeds=[0], scenario_options={**SMALL, "lm": gpt.TIER1},
                  data_root=tier_root)


def test_lora_adapts_gpt2s_conv1d_projections_and_trains_only_them_and_the_head(tier_root):
    scenario = registry.scenarios.get("lm-general-to-code").factory(
        data_root=tier_root, seed=0, lm=gpt.TIER1, **SMALL)
    scenario.protocol = dataclasses.replace(scenario.protocol, **TINY)
    for train_head in (True, False):
        torch.manual_seed(0)
        model = build_model(gpt.TIER1, (gpt.CONTEXT,), 256)
        ctx = TrainContext.create(model, scenario, "domain")
        lora = make_strategy("lora", "domain", {"lora": {"rank": 2, "train_head": train_head}})
        lora.setup(ctx)
        adapted = ctx.log["lora"]["modules"]
        assert len(adapted) == 4 * 4 and all(n.endswith(("c_attn", "c_proj", "c_fc"))
                                             for n in adapted)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        ctx.task_index = 1
        train_task(ctx, lora, scenario.tasks[1])
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert moved and all(".branch.sets." in n or n.startswith("head.") for n in moved)
        assert ("head.weight" in moved) == train_head
        assert split_head(model)[1] is model.head


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft on transformers 5
def test_lora_on_conv1d_computes_what_peft_computes(tier_root):
    peft = pytest.importorskip("peft")
    scenario = registry.scenarios.get("lm-general-to-code").factory(
        data_root=tier_root, seed=0, lm=gpt.TIER1, **SMALL)
    torch.manual_seed(0)
    ours = build_model(gpt.TIER1, (gpt.CONTEXT,), 256).eval()
    plain = copy.deepcopy(ours)
    theirs = peft.get_peft_model(copy.deepcopy(ours.features.transformer), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True))
    make_strategy("lora", "domain", {"lora": {"rank": 2, "alpha": 4.0, "targets": "*c_attn"}}
                  ).setup(TrainContext.create(ours, scenario, "domain"))
    with torch.no_grad():
        for block, twin in zip(ours.features.transformer.h, theirs.base_model.model.h,
                               strict=True):
            adapter = block.attn.c_attn.branch.sets[0]
            adapter.up.normal_()  # B starts at zero in both: make the update visible
            twin.attn.c_attn.lora_A["default"].weight.copy_(adapter.down)
            twin.attn.c_attn.lora_B["default"].weight.copy_(adapter.up)
        x = scenario.tasks[1].x_test[:2].long()
        expected = ours.head(theirs(input_ids=x).last_hidden_state)
        assert not torch.allclose(plain(x), expected, atol=1e-3)
        torch.testing.assert_close(ours(x), expected)


def saved_hf_model(directory: Path) -> Path:
    """A tiny GPT-2 and a byte-level tokenizer, built from configs and saved as a hub model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = bytes_to_unicode()
    tokenizer = Tokenizer(models.BPE(vocab={symbols[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(directory)
    torch.manual_seed(1)
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=None, eos_token_id=None)).save_pretrained(directory)
    return directory


def test_a_hugging_face_model_from_a_directory_is_fine_tuned_like_tier_1(tier_root, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = f"hf:{saved_hf_model(tmp_path / 'tiny-gpt2')}"
    record = lm_run(tier_root, "naive", lm=spec)
    assert record.config["protocol"]["model"] == spec
    loss = record.matrices["loss"]
    assert loss[1][0] != pytest.approx(loss[0][0])  # the saved weights, not a fresh init
    encode, size = gpt.tokenizer(spec)
    assert size == 256 and list(encode("hé")) == list("hé".encode())


def test_a_hub_model_without_network_or_cache_fails_in_one_line(tier_root, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli.main(["run", "--scenario", "lm-general-to-code", "--option", "lm=hf:gpt2",
                     "--strategy", "naive", "--data-root", str(tier_root),
                     "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "hf:gpt2" in err and "hf download gpt2" in err and "HF_HOME" in err


def saved_hf_dataset(directory: Path, root: Path) -> Path:
    """A Hugging Face dataset on disk: held-out fortunes, one JSON row {"text": ...} each."""
    from cfbench.data.text import load_corpus, split_documents

    directory.mkdir(parents=True)
    heldout = split_documents(load_corpus("fortunes", root).documents).heldout
    (directory / "train.jsonl").write_text(
        "".join(json.dumps({"text": d.text}) + "\n" for d in heldout), encoding="utf-8")
    return directory


def test_a_hugging_face_dataset_is_the_source_and_every_task_names_its_data(tier_root,
                                                                            tmp_path,
                                                                            monkeypatch):
    """Offline: a model and a dataset, both Hugging Face directories built here. The source
    task reads the dataset's rows as documents; every task's record names its corpus, the
    corpus's SHA-256 and the document split, and a built-in corpus's SHA-256 is the pinned
    one."""
    import hashlib

    from cfbench.data.text import CORPORA, load_hf_corpus

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = f"hf:{saved_hf_model(tmp_path / 'tiny-gpt2')}"
    source = f"hf:{saved_hf_dataset(tmp_path / 'english', tier_root)}"
    (config,) = plan_runs(scenario="lm-general-to-code", settings=["domain"],
                          strategies=["naive"], hparams={}, seeds=[0],
                          scenario_options={**SMALL, "lm": model, "source": source},
                          protocol_overrides=TINY, data_root=tier_root)
    record = execute(config, tier_root)
    assert record.status == "ok", record.traceback
    english, code = (task["data"] for task in record.tasks)
    rows = (tmp_path / "english" / "train.jsonl").read_text().splitlines()
    corpus = load_hf_corpus(source)
    assert english["corpus"] == source and corpus.manifest["rows"] == len(rows)
    assert english["sha256"] == hashlib.sha256(b"".join(
        json.dumps({"id": str(i), "text": json.loads(row)["text"]}, ensure_ascii=False)
        .encode() + b"\n" for i, row in enumerate(rows))).hexdigest()
    assert english["split"]["train_documents"] + english["split"]["heldout_documents"] == \
        len(rows)
    assert code["corpus"] == "python-code" and code["sha256"] == CORPORA["python-code"].sha256
    assert record.tasks[0]["name"] == source
    # The option is left out at its default, so the committed records' run ids stay valid.
    (default,) = plan_runs(scenario="lm-general-to-code", settings=["domain"],
                           strategies=["naive"], hparams={}, seeds=[0],
                           scenario_options={**SMALL, "lm": model}, data_root=tier_root)
    assert "source" not in default.scenario_options


@pytest.mark.parametrize("option", ["source", "targets"])
def test_a_hub_dataset_without_network_or_cache_fails_in_one_line(language_root, tmp_path,
                                                                  capsys, monkeypatch, option):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    name = "hf:cfbench-test/no-such-dataset:raw"
    code = cli.main(["run", "--scenario", "lm-general-to-code", "--option", f"{option}={name}",
                     "--strategy", "naive", "--data-root", str(language_root),
                     "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert name in err and "datasets.load_dataset('cfbench-test/no-such-dataset', 'raw')" in err
    assert not (tmp_path / "runs").exists()
