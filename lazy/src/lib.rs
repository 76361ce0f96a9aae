//! strata's lazy layers: the eStargz format ([`estargz`]).

pub mod estargz;
