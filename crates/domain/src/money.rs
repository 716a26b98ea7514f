//! Money: ISO 4217 currencies and integer amounts in minor units.
//!
//! Amounts are never floats. Every arithmetic step that could overflow is
//! checked and surfaces as [`crate::ErrorCode::Overflow`].

use std::fmt;

/// Largest amount a single transfer may move: 2^53 - 1, so that every amount
/// survives a round trip through a JSON number in any client language.
pub const MAX_TRANSFER_AMOUNT: u64 = (1 << 53) - 1;

/// Active ISO 4217 alphabetic codes (plus the precious metals and XTS/XXX are
/// left out on purpose: they are not money a ledger should move).
const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN", "BHD", "BIF",
    "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF", "CHF", "CLP", "CNY", "COP", "CRC",
    "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS",
    "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD",
    "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL",
    "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MYR", "MZN", "NAD",
    "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD",
    "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP",
    "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS", "VES",
    "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWG",
];

/// A valid ISO 4217 currency code. Three upper-case ASCII letters, stored inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

impl Currency {
    /// Parses a code such as `"USD"`. Lower case is refused: codes are case-sensitive.
    pub fn parse(code: &str) -> Option<Currency> {
        if ISO_4217.binary_search(&code).is_err() {
            return None;
        }
        let bytes = code.as_bytes();
        Some(Currency([bytes[0], bytes[1], bytes[2]]))
    }

    /// Rebuilds a currency from its three bytes, as stored in the log.
    pub fn from_bytes(bytes: [u8; 3]) -> Option<Currency> {
        std::str::from_utf8(&bytes).ok().and_then(Currency::parse)
    }

    pub fn as_bytes(&self) -> [u8; 3] {
        self.0
    }

    pub fn as_str(&self) -> &str {
        // The constructor admits only ASCII letters.
        std::str::from_utf8(&self.0).expect("currency is ASCII")
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transfer amount in minor units: never zero, at most [`MAX_TRANSFER_AMOUNT`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Amount(u64);

impl Amount {
    pub fn new(minor_units: u64) -> Option<Amount> {
        (minor_units > 0 && minor_units <= MAX_TRANSFER_AMOUNT).then_some(Amount(minor_units))
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_table_is_sorted_so_binary_search_works() {
        let mut sorted = ISO_4217.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted, ISO_4217);
    }

    #[test]
    fn currencies() {
        for (input, ok) in
            [("USD", true), ("CNY", true), ("usd", false), ("US", false), ("XXX", false), ("USDD", false), ("", false)]
        {
            assert_eq!(Currency::parse(input).is_some(), ok, "{input}");
        }
        let usd = Currency::parse("USD").unwrap();
        assert_eq!(Currency::from_bytes(usd.as_bytes()), Some(usd));
        assert_eq!(usd.to_string(), "USD");
    }

    #[test]
    fn amounts() {
        assert_eq!(Amount::new(0), None);
        assert_eq!(Amount::new(1).map(Amount::get), Some(1));
        assert!(Amount::new(MAX_TRANSFER_AMOUNT).is_some());
        assert_eq!(Amount::new(MAX_TRANSFER_AMOUNT + 1), None);
    }
}
