//! Locating, verifying and reading the project's cached assets.
