//! Data-driven tests of the pricing state machine.
