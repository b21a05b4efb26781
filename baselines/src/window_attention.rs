//! Padded window attention (in progress)
