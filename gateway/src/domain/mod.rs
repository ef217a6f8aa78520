//! The domain: values that parse instead of validate ([`values`]), typed
//! ids ([`ids`]), the states and outcomes the gateway records
//! ([`states`]), the lane of the delivery queue and its rules ([`lane`]), the
//! share of a worker's slots each app may hold ([`share`]), ordered
//! delivery per key ([`ordering`]),
//! and the records the API, the store and the delivery worker exchange
//! ([`records`]). Nothing here touches a database or the
//! network.

pub mod ids;
pub mod lane;
pub mod ordering;
pub mod records;
pub mod share;
pub mod states;
pub mod values;

pub use ids::*;
pub use records::*;
pub use states::*;
pub use values::*;
