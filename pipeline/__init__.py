"""Dataset scale: many images -> one independent UnZipLoRA fit each -> a LoRA library + Parquet manifest.

Built only on unziplora's public API; knows Ray, fsspec and Parquet, which unziplora does not.

    run/       the job: spec, inputs, item ids, plan, Ray executors, the fit worker
    store/     the library on storage: paths and writes, layout, manifest, lease, repair, forget
    quality/   previews, quality scores, the quality gate, rescoring
    registry/  MLflow tracking, registered LoRAs and their names, sync, figures
    bank/      the style bank: search over a library, gallery
"""
