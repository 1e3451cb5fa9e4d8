"""The style bank: text / image / metadata search over a library's manifest, a static gallery, and the
lookups that let `unziplora generate` recombine LoRAs straight from a library.

    index      `build_bank`: vectors next to the manifest (bank/), incremental
    embedders  text (MiniLM) and image (CLIP, tiny, or any `module:factory`) embedders
    search     `Bank`: load once, `search`, `mask` (filters), `resolve` an item or a query, fetch a fit
    gallery    `write_gallery`: index.html + thumbnails, no server
"""

from .embedders import load_embedder
from .gallery import write_gallery
from .index import build_bank
from .search import Bank

__all__ = ["Bank", "build_bank", "load_embedder", "write_gallery"]
