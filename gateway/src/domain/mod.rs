//! The domain: values that parse instead of validate ([`values`]), typed
//! ids ([`ids`]), the states and outcomes the gateway records
//! ([`states`]), the lane of the delivery queue and its rules ([`lane`]),
//! and the records the API, the store and the delivery worker exchange
//! ([`records`]). Nothing here touches a database or the
//! network.

pub mod ids;
pub mod lane;
pub mod records;
pub mod states;
pub mod values;

pub use ids::*;
pub use records::*;
pub use states::*;
pub use values::*;
