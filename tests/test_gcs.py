"""The GCS emulator the gs:// tests run against: etils.epath and Orbax reach it, and nothing else."""
import jax
import jax.numpy as jnp
import numpy as np


def test_epath_and_orbax_read_and_write_on_the_emulator(gcs_bucket):
    import orbax.checkpoint as ocp
    from etils import epath

    from osp_jax import cli

    run = epath.Path(gcs_bucket) / "run"
    cli.write_json(run / "a.json", {"x": 1.5, "nan": float("nan")})
    assert cli.read_json(run / "a.json") == {"x": 1.5, "nan": None}
    assert [p.name for p in run.iterdir()] == ["a.json"]

    with ocp.CheckpointManager(run / "ckpt", options=ocp.CheckpointManagerOptions(create=True)) as mngr:
        mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.arange(6.0)})))
        mngr.wait_until_finished()
        target = {"w": jax.ShapeDtypeStruct((6,), jnp.float32)}
        restored = mngr.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    np.testing.assert_array_equal(restored.state["w"], np.arange(6.0))
