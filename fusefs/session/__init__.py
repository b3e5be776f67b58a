"""FUSE sessions: mounting (:mod:`.mount`), our trio session (:mod:`.session`) and pyfuse3's
(:mod:`.pyfuse3_backend`).  Import the submodule you need; this package imports nothing."""
