//! Home of the side-by-side baselines (naive relay etc.) from the loadgen issue on; criterion benches live in benches/.
