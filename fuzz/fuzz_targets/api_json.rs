//! The REST API's JSON request bodies: arbitrary bytes as every body type. Must not panic.
#![no_main]

use fieldgate_registry::{
    DevicePatch, DeviceQuery, NewCommand, NewDevice, NewProvisioningToken, Registration,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let _outcome = serde_json::from_slice::<NewDevice>(body);
    let _outcome = serde_json::from_slice::<DevicePatch>(body);
    let _outcome = serde_json::from_slice::<DeviceQuery>(body);
    let _outcome = serde_json::from_slice::<NewProvisioningToken>(body);
    let _outcome = serde_json::from_slice::<Registration>(body);
    let _outcome = serde_json::from_slice::<NewCommand>(body);
});
