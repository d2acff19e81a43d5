"""The federated personalization phase, in process (real ClientApps, no Ray).

2 training sites + 1 held-out (unseen) site: the unseen site never gets a train or evaluate
message, every site personalizes the final global model after the last round, the replies carry
scalar metrics only, the weights stay at the sites, and ``results.json`` / ``report.md`` show
before/after per site with the right seen flags.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import pytest
import torch
from flwr.app import Context, Message
from inprocess import InProcessGrid
from test_app_support import tiny_config, tiny_sites

from client.app import app as client_app
from client.personalize import MODEL_FILE, REPORT_FILE, is_unseen
from fedunroll.report import ResultsError, personalization_table, write_report
from fedunroll.report import validate_results as validate_report
from recon.config import ConfigError, parse_run_config
from server.app import run_federation
from server.results import read, validate_results

METRICS = ("ssim", "nrmse", "psnr")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    return tiny_sites(tmp_path_factory)


def test_personalize_keys_parse_and_validate() -> None:
    cfg = parse_run_config({})
    assert not cfg.personalize.enabled and cfg.data.unseen_sites == 0
    cfg = parse_run_config({"personalize.lrs": "1e-5, 1e-4", "data.unseen-sites": 2})
    assert cfg.personalize.lr_values == (1e-5, 1e-4) and cfg.data.unseen_sites == 2
    assert parse_run_config({"personalize.lrs": 1e-4}).personalize.lr_values == (1e-4,)
    for bad in ({"personalize.lrs": "fast"}, {"personalize.lrs": "-1e-3"}):
        with pytest.raises(ConfigError, match="personalize.lrs"):
            parse_run_config(bad)
    with pytest.raises(ConfigError, match="personalize.folds"):
        parse_run_config({"personalize.folds": 1})
    with pytest.raises(ConfigError, match="data.unseen-sites"):
        parse_run_config({"data.unseen-sites": -1})


def test_unseen_from_partition_or_node_config() -> None:
    cfg = parse_run_config({"data.num-sites": 2, "min-fit-clients": 2})
    assert not is_unseen({"partition-id": 1}, cfg)
    assert is_unseen({"partition-id": 2}, cfg)
    assert is_unseen({"data-path": "/d", "unseen": "true"}, cfg)
    assert not is_unseen({"data-path": "/d"}, cfg)


def test_seen_and_unseen_sites_personalize_and_only_metrics_come_back(root, tmp_path) -> None:
    received: dict[str, list[str]] = defaultdict(list)  # site -> message types
    replies: list[Message] = []

    def recording(msg: Message, ctx: Context) -> Message:
        received[f"site{ctx.node_config['partition-id']}"].append(msg.metadata.message_type)
        reply = client_app(msg, ctx)
        if msg.metadata.message_type == "train.personalize":
            replies.append(reply)
        return reply

    flat = tiny_config(
        root,
        tmp_path,
        {
            "strategy.name": "fedavg",
            "num-server-rounds": 1,
            "train.local-steps": 4,
            "data.num-sites": 2,
            "data.unseen-sites": 1,
            "personalize.enabled": True,
            "personalize.lrs": "1e-3",
            "personalize.folds": 2,
            "personalize.max-epochs": 2,
            "personalize.patience": 1,
            "run.name": "p",
        },
    )
    grid = InProcessGrid({10 + i: recording for i in range(3)}, flat)
    try:
        res = run_federation(grid, parse_run_config(flat))
        assert res["status"] == "completed"
        assert res["sites"] == ["site0", "site1"]  # the unseen site is not a training site
        assert set(res["final"]["federated"]) == {"site0", "site1"}
        for r in res["rounds"]:
            assert set(r["train"]) == set(r["eval"]) == {"site0", "site1"}, r

        # the held-out site only answered the site query and personalized
        assert received["site2"] == ["query.site", "train.personalize"]
        for site in ("site0", "site1"):
            assert "train" in received[site] and received[site][-1] == "train.personalize"

        # privacy: personalization replies carry scalar metrics and the site id, no arrays
        assert len(replies) == 3
        for reply in replies:
            assert not reply.has_error(), reply.error
            assert not reply.content.array_records, set(reply.content.array_records)
            assert set(reply.content.metric_records) == {"metrics"}
            metrics = dict(reply.content.metric_records["metrics"])
            assert all(isinstance(v, int | float) for v in metrics.values()), metrics
            assert set(reply.content.config_records["config"]) == {"site-id"}

        saved = read(tmp_path / "p")
        assert saved == res
        validate_results(saved)
        validate_report(saved)
        pers = saved["personalization"]
        assert {s: e["seen"] for s, e in pers.items()} == {
            "site0": True,
            "site1": True,
            "site2": False,
        }
        for site, entry in pers.items():
            assert "error" not in entry, (site, entry)
            for when in ("before", "after"):
                assert set(entry[when]) == set(METRICS)
                assert all(math.isfinite(v) for v in entry[when].values())
            assert isinstance(entry["fine_tune"], bool) and entry["decision"]
            if entry["fine_tune"]:
                assert entry["r_fine"] == pytest.approx(1e-3) and 1 <= entry["n_fine"] <= 2
            else:
                assert entry["r_fine"] is None and entry["n_fine"] == 0
                assert entry["after"] == entry["before"]  # the global model was kept
            # the personalized weights and the full report stay at the site
            folder = root / site / ".fedunroll"
            ckpt = torch.load(folder / MODEL_FILE, weights_only=False)
            assert ckpt["site"] == site and "state_dict" in ckpt
            assert (folder / REPORT_FILE).is_file()

        md = write_report(tmp_path / "p", grid=False, echo=False).read_text()
        assert "## Personalization" in md
        for site, kind in (("site0", "seen"), ("site1", "seen"), ("site2", "unseen")):
            assert f"| {site} | {kind} | {pers[site]['before']['ssim']:.4f} |" in md
    finally:
        for site in ("site0", "site1", "site2"):
            for name in (MODEL_FILE, REPORT_FILE):
                (root / site / ".fedunroll" / name).unlink(missing_ok=True)


def _entry(seen: bool, before: float, after: float) -> dict:
    return {
        "seen": seen,
        "before": {"ssim": before, "nrmse": 0.2, "psnr": 25.0},
        "after": {"ssim": after, "nrmse": 0.1, "psnr": 27.0},
        "r_fine": 1e-4 if after != before else None,
        "n_fine": 3 if after != before else 0,
        "fine_tune": after != before,
        "decision": "fine-tuned" if after != before else "kept the global model",
    }


def test_report_personalization_table_and_schema() -> None:
    from test_report import make_results

    results = make_results()
    assert personalization_table(results) is None  # absent: no section, no error
    results["personalization"] = {
        "site0": _entry(True, 0.80, 0.80),
        "site1": _entry(True, 0.70, 0.75),
        "site9": _entry(False, 0.50, 0.65),
        "site8": {"seen": False, "error": "site site8: RuntimeError: disk on fire"},
    }
    validate_report(results)
    table = personalization_table(results)
    assert table is not None
    rows = table.splitlines()
    assert rows[2].startswith("| site0 | seen | 0.8000 | 0.8000 |")
    assert rows[4].startswith("| site8 | unseen |") and "failed: site site8" in rows[4]
    assert "| site9 | unseen | 0.5000 | 0.6500 |" in table and "0.1500" in table
    assert "| **mean** | seen | 0.7500 | 0.7750 |" in table
    bad = copy.deepcopy(results)
    del bad["personalization"]["site1"]["after"]
    with pytest.raises(ResultsError, match="personalization.site1.after"):
        validate_report(bad)
    bad = copy.deepcopy(results)
    bad["personalization"]["site1"]["seen"] = "yes"
    with pytest.raises(ResultsError, match="personalization.site1.seen"):
        validate_report(bad)


def test_personalized_searched_model_checkpoint_loads(root, tmp_path) -> None:
    """A NAS run's genotype travels in the messages; the site's personalized checkpoint names a
    copy of it, so ``load_checkpoint`` rebuilds the searched network, not the search net."""
    import json

    from test_app_support import context, message

    from recon.models import build_model
    from recon.models.checkpoint import load_checkpoint
    from recon.nas import PUBLISHED
    from strategies.protocol import NAS_GENOTYPE, to_record

    flat = tiny_config(
        root,
        tmp_path,
        {
            "model.denoiser": "nas",
            "nas.search-rounds": 1,
            "personalize.lrs": "1e-3",
            "personalize.folds": 2,
            "personalize.max-epochs": 1,
            "personalize.patience": 1,
        },
    )
    cfg = parse_run_config(flat)
    model = build_model(cfg.model, genotype=PUBLISHED)
    arrays = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    config = {NAS_GENOTYPE: json.dumps(PUBLISHED.to_dict())}
    msg = message(to_record(arrays), config, message_type="train.personalize")
    folder = root / "site0" / ".fedunroll"
    try:
        reply = client_app(msg, context(flat, {"partition-id": 0}))
        assert not reply.has_error(), reply.error
        loaded, model_cfg, _ = load_checkpoint(folder / MODEL_FILE)
        assert model_cfg.nas_genotype and model_cfg.nas_genotype.startswith(str(folder))
        assert loaded.state_dict().keys() == model.state_dict().keys()
    finally:
        for name in (MODEL_FILE, REPORT_FILE, "personalized_genotype.json"):
            (folder / name).unlink(missing_ok=True)
