//! The uplink to the cloud broker: the bridge rules (`rules`) decide what goes up and what comes
//! down and how topics are renamed; `outbox` picks the next row to send; `pace` holds the
//! reconnect backoff and the rate limit. All sans-IO. The upstream session itself is
//! `proto::mqtt::client`; `io::uplink` joins them to a socket, the store and the hub.

pub mod outbox;
pub mod pace;
pub mod rules;
