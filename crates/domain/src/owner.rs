//! Who an account belongs to. Access control acts on it: a merchant's key
//! moves money only out of its own accounts, an app acts for one buyer.
//! Platform accounts (fees, clearing, treasury) have no owner.

use std::fmt;

use crate::Id;

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Owner {
    Merchant(Id),
    Buyer(Id),
}

impl Owner {
    /// Parses `merchant:<id>` or `buyer:<id>`, `<id>` being a valid [`Id`]
    /// without `~` (see [`Id::parse_plain`]).
    pub fn parse(text: &str) -> Option<Owner> {
        if let Some(id) = text.strip_prefix("merchant:") {
            return Id::parse_plain(id).map(Owner::Merchant);
        }
        if let Some(id) = text.strip_prefix("buyer:") {
            return Id::parse_plain(id).map(Owner::Buyer);
        }
        None
    }

    pub fn id(&self) -> &Id {
        match self {
            Owner::Merchant(id) | Owner::Buyer(id) => id,
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Merchant(id) => write!(f, "merchant:{id}"),
            Owner::Buyer(id) => write!(f, "buyer:{id}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_parse_and_print_back() {
        for (text, ok) in [
            ("merchant:m1", true),
            ("buyer:alice", true),
            ("merchant:a:b", true),
            ("merchant:", false),
            ("buyer:has space", false),
            ("admin", false),
            ("seller:m1", false),
            ("Merchant:m1", false),
        ] {
            let owner = Owner::parse(text);
            assert_eq!(owner.is_some(), ok, "{text:?}");
            if let Some(owner) = owner {
                assert_eq!(owner.to_string(), text);
            }
        }
        assert_eq!(Owner::parse("merchant:m1"), Some(Owner::Merchant(Id::parse("m1").unwrap())));
        assert_ne!(Owner::parse("merchant:x"), Owner::parse("buyer:x"));
    }
}
