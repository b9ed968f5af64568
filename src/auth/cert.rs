//! The one thing outpost reads out of a client certificate: the subject's Common Name, which
//! `use_identity_as_username` makes the user name (as mosquitto does). rustls has already
//! verified the certificate by the time we look; this walks just enough DER to find the
//! name, and any surprise in the encoding yields no name (the login is then refused), never a
//! panic.

/// OID 2.5.4.3, commonName.
const CN_OID: &[u8] = &[0x55, 0x04, 0x03];

/// The first Common Name in the subject of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (cert, _) = expect(0x30, der)?;
    let (tbs, _) = expect(0x30, cert)?;
    let mut rest = tbs;
    // version [0] EXPLICIT is optional; then serial, signature, issuer, validity, subject.
    if rest.first() == Some(&0xA0) {
        rest = tlv(rest)?.2;
    }
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (mut rdns, _) = expect(0x30, rest)?;
    while !rdns.is_empty() {
        let (set, after) = expect(0x31, rdns)?;
        rdns = after;
        let mut attrs = set;
        while !attrs.is_empty() {
            let (attr, after) = expect(0x30, attrs)?;
            attrs = after;
            let (oid, value) = expect(0x06, attr)?;
            if oid == CN_OID {
                let (tag, bytes, _) = tlv(value)?;
                return text(tag, bytes);
            }
        }
    }
    None
}

/// A directory string's text, by its ASN.1 type.
fn text(tag: u8, bytes: &[u8]) -> Option<String> {
    match tag {
        // UTF8String, PrintableString, IA5String
        0x0C | 0x13 | 0x16 => String::from_utf8(bytes.to_vec()).ok(),
        // TeletexString: in practice Latin-1.
        0x14 => Some(bytes.iter().map(|&b| b as char).collect()),
        // BMPString: UTF-16BE.
        0x1E if bytes.len() % 2 == 0 => {
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()
        }
        _ => None,
    }
}

/// One element with tag `tag`: its contents and what follows it.
fn expect(tag: u8, input: &[u8]) -> Option<(&[u8], &[u8])> {
    let (t, content, rest) = tlv(input)?;
    (t == tag).then_some((content, rest))
}

/// One DER element: tag, contents, and what follows. Single-byte tags and definite lengths
/// only, which is all DER certificates use.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    if tag & 0x1F == 0x1F {
        return None;
    }
    let (&first, mut input) = input.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7F) as usize;
        if n == 0 || n > 4 || input.len() < n {
            return None;
        }
        let (digits, after) = input.split_at(n);
        input = after;
        digits
            .iter()
            .fold(0usize, |acc, &d| (acc << 8) | d as usize)
    };
    if input.len() < len {
        return None;
    }
    let (content, rest) = input.split_at(len);
    Some((tag, content, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn reads_the_common_name() {
        // Made with: openssl req -x509 -newkey ec ... -subj "/C=NO/O=Outpost Test/CN=sensor-17.site.example"
        let cert = der(include_str!("testdata/cn.pem"));
        assert_eq!(
            common_name(&cert).as_deref(),
            Some("sensor-17.site.example")
        );
        let none = der(include_str!("testdata/no-cn.pem"));
        assert_eq!(common_name(&none), None);
    }

    #[test]
    fn garbage_and_truncations_yield_nothing() {
        let cert = der(include_str!("testdata/cn.pem"));
        for n in 0..cert.len() {
            assert_eq!(common_name(&cert[..n]), None, "truncated at {n}");
        }
        assert_eq!(common_name(&[0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]), None);
        assert_eq!(common_name(&[0x1F, 0x00]), None);
        assert_eq!(text(0x1E, &[0x00, 0x61, 0x00]), None);
        assert_eq!(text(0x1E, &[0x00, 0x61]).as_deref(), Some("a"));
    }
}
