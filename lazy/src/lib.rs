//! strata's lazy layers: the eStargz format ([`estargz`]), verified chunks
//! from a cache or range requests ([`fetch`]) and the read-only FUSE
//! filesystem of a layer ([`fs`]).

pub mod estargz;
pub mod fetch;
pub mod fs;
