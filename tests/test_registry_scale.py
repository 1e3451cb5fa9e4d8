"""benchmarks/registry_scale.py on a tiny scale: both layouts on a local SQLite store, its printed figures."""

import re

import pytest

from benchmarks import registry_scale

pytestmark = pytest.mark.timeout(300)


def test_registry_benchmark_small(tmp_path, capsys):
    plot = tmp_path / "registry.png"
    assert registry_scale.main(["--versions", "20", "60", "--backends", "sqlite", "--window", "3",
                                "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    for layout in ("old", "new"):
        block = out.split(f"[sqlite, {layout} layout]")[1]
        figures = dict(re.findall(r"^(\w+) = ([\d.]+)$", block, re.M)[:4])
        assert set(figures) == {"register_ms_at_20", "register_ms_at_60", "register_growth", "lookup_ms_at_60"}
        assert float(figures["register_growth"]) == pytest.approx(
            float(figures["register_ms_at_60"]) / float(figures["register_ms_at_20"]), rel=0.02)
    assert plot.stat().st_size > 10_000


def test_new_layout_filler_matches_registration(tmp_path):
    """The bulk filler writes what Tracker.register writes: a registered item and a filled one carry the same
    tag keys, and both are found by `registry get`'s look-up."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri, uri)
    layout = registry_scale.New(client, uri)
    for name in layout.models():
        client.create_registered_model(name)
    run = client.create_run(client.get_experiment_by_name(registry_scale.LIBRARY).experiment_id).info.run_id
    import sqlalchemy as sa

    registry_scale.fill(sa.create_engine(uri), layout, 0, 1, run)
    layout.register(registry_scale.fake_row(1), run)
    filled, registered = (layout.lookup("style", registry_scale.item_id(n)) for n in (0, 1))
    def keys(version):  # each item's own tag key, `item-<id>`, as one
        return sorted(re.sub(r"^item-[0-9a-f]{16}$", "item-*", k) for k in version.tags)

    assert keys(filled) == keys(registered) and "item-*" in keys(filled)
    assert filled.tags["library_key"] == registered.tags["library_key"] == layout.tracker.library_key
    assert (int(filled.version), int(registered.version)) == (1, 2) and not client.get_registered_model(
        f"{registry_scale.LIBRARY}-style").aliases
