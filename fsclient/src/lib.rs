//! dictfs file system client. Not yet built: see issue "fsclient core" and docs/FORMAT.md (to come).
