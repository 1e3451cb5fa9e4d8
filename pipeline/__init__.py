"""Dataset scale: many images -> one independent UnZipLoRA fit each -> a LoRA library + Parquet manifest.

Built only on unziplora's public API; knows Ray, fsspec and Parquet, which unziplora does not.
"""
