#![no_std]
// This file exists to enable the library target, so leak-user can name this crate as a
// build dependency; the programs are in the `leak` binary target (main.rs).
