//! Host tuning for actrix edge nodes.
