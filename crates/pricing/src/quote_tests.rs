//! Data-driven tests of the quote.
