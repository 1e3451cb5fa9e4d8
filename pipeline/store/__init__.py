"""The library on storage: fsspec paths and writes, its layout, the Parquet manifest, the lease, repair, forget."""
