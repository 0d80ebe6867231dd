//! sandboxd host daemon library.
