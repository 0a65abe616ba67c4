//! Tests of the simulator, and of the gateway's [`Link`] against it over ptys and Modbus TCP.
//! A third-party master (tokio-modbus) proves the simulator speaks real Modbus; our `Link`
//! against it proves the two agree and that the link's safeguards hold.

use std::time::{Duration, Instant};

use super::*;
use crate::field::link::{self, Link, LinkSettings, Transport};

const SMOKE: UnitId = UnitId(1);
const SMOKE_2: UnitId = UnitId(2);
const DOOR: UnitId = UnitId(50);
const RELAY: UnitId = UnitId(100);

fn field(baud: u32) -> Simulator {
    Simulator::new(
        baud,
        [
            (SMOKE, SimProfile::Smoke),
            (SMOKE_2, SimProfile::Smoke),
            (DOOR, SimProfile::Door),
            (RELAY, SimProfile::Relay),
        ],
    )
}

fn rtu(path: &str, baud: u32, timeout_ms: u64) -> LinkSettings {
    LinkSettings {
        transport: Transport::Rtu {
            port: path.to_owned(),
            baud,
            parity: Parity::None,
            stop_bits: 1,
            echo: false,
        },
        timeout: Duration::from_millis(timeout_ms),
        turnaround: Duration::from_millis(5),
    }
}

fn status_read() -> Request {
    Request::ReadInputRegisters {
        address: 0,
        count: 4,
    }
}

async fn registers(link: &mut Link, unit: UnitId, req: &Request) -> Vec<u16> {
    match link.call(unit, req).await {
        Ok(Ok(Response::Registers(r))) => r,
        other => panic!("unit {unit}: {other:?}"),
    }
}

#[tokio::test]
async fn a_third_party_rtu_master_reads_the_detector_status() {
    use tokio_modbus::client::Reader;
    let sim = field(115_200);
    sim.set_smoke(SMOKE, SmokeState::Alarm);
    let pty = sim.serve_pty().unwrap();
    let port = tokio_serial::SerialStream::open(&tokio_serial::new(pty.path(), 115_200)).unwrap();
    let mut ctx = tokio_modbus::client::rtu::attach_slave(port, tokio_modbus::Slave(SMOKE.0));
    let regs = tokio::time::timeout(Duration::from_secs(5), ctx.read_input_registers(0, 4))
        .await
        .expect("the simulator answers in time")
        .expect("transport ok")
        .expect("no exception");
    assert_eq!(regs[0], 1, "status = alarm");
    assert_eq!(regs.len(), 4);
}

#[tokio::test]
async fn link_reads_status_and_sees_an_alarm_after_set_smoke() {
    let sim = field(115_200);
    let pty = sim.serve_pty().unwrap();
    let mut link = Link::open(rtu(pty.path(), 115_200, 500)).await.unwrap();
    let regs = registers(&mut link, SMOKE, &status_read()).await;
    assert_eq!(&regs[..3], &[0, 0, 0], "normal, no smoke, no fault");

    sim.set_smoke(SMOKE, SmokeState::Alarm);
    sim.set_density(SMOKE, 0.25);
    assert_eq!(
        &registers(&mut link, SMOKE, &status_read()).await[..2],
        &[1, 25]
    );
    sim.set_smoke(SMOKE, SmokeState::Fault);
    assert_eq!(
        &registers(&mut link, SMOKE, &status_read()).await[..3],
        &[2, 25, 1]
    );
    assert_eq!(link.stats().transactions, 3);
    assert!(sim.requests_served() >= 3);
}

#[tokio::test]
async fn coil_write_shows_in_coil_and_in_subscribe_stamped_when_received() {
    let sim = field(38_400);
    let pty = sim.serve_pty().unwrap();
    let mut events = sim.subscribe();
    let mut link = Link::open(rtu(pty.path(), 38_400, 500)).await.unwrap();
    let before = Instant::now();
    let reply = link
        .call(
            RELAY,
            &Request::WriteSingleCoil {
                address: 3,
                on: true,
            },
        )
        .await
        .unwrap();
    let after = Instant::now();
    assert_eq!(
        reply,
        Ok(Response::WriteSingleCoil {
            address: 3,
            on: true
        })
    );
    assert_eq!(sim.coil(RELAY, 3), Some(true));
    assert_eq!(sim.coil(RELAY, 2), Some(false));
    let event = events.recv().await.unwrap();
    assert_eq!(event.unit, RELAY);
    assert_eq!(
        event.what,
        SimChange::CoilWritten {
            address: 3,
            on: true
        }
    );
    assert!(event.at >= before && event.at <= after);

    let reply = link
        .call(
            RELAY,
            &Request::ReadCoils {
                address: 0,
                count: 8,
            },
        )
        .await
        .unwrap();
    let mut expected = vec![false; 8];
    expected[3] = true;
    assert_eq!(reply, Ok(Response::Bits(expected)));
}

#[tokio::test]
async fn an_offline_unit_times_out_and_the_next_live_unit_answers_with_its_own_values() {
    let sim = field(115_200);
    sim.set_smoke(SMOKE_2, SmokeState::PreAlarm);
    let pty = sim.serve_pty().unwrap();
    let mut link = Link::open(rtu(pty.path(), 115_200, 100)).await.unwrap();
    sim.set_offline(SMOKE, true);
    assert!(matches!(
        link.call(SMOKE, &status_read()).await,
        Err(link::Error::Timeout)
    ));
    assert_eq!(registers(&mut link, SMOKE_2, &status_read()).await[0], 3);
    sim.set_offline(SMOKE, false);
    assert_eq!(registers(&mut link, SMOKE, &status_read()).await[0], 0);
    assert_eq!(link.stats().timeouts, 1);
}

#[tokio::test]
async fn a_late_reply_is_never_attributed_to_the_next_unit() {
    let sim = field(115_200);
    sim.set_smoke(SMOKE, SmokeState::Alarm);
    sim.set_reply_delay(SMOKE, Duration::from_millis(150));
    let pty = sim.serve_pty().unwrap();
    let mut link = Link::open(rtu(pty.path(), 115_200, 50)).await.unwrap();
    assert!(matches!(
        link.call(SMOKE, &status_read()).await,
        Err(link::Error::Timeout)
    ));
    // Unit 1's alarm reply arrives while we ask unit 2: it must be refused or discarded, never
    // read as unit 2's status.
    for _ in 0..5 {
        match link.call(SMOKE_2, &status_read()).await {
            Ok(Ok(Response::Registers(r))) => assert_eq!(r[0], 0, "unit 2 is normal"),
            Err(link::Error::Frame(FrameError::ForeignUnit { got })) => assert_eq!(got, SMOKE),
            Err(link::Error::Timeout) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(registers(&mut link, SMOKE_2, &status_read()).await[0], 0);
}

#[tokio::test]
async fn reply_takes_at_least_the_wire_time_of_the_line() {
    let sim = field(9600);
    let pty = sim.serve_pty().unwrap();
    let mut link = Link::open(rtu(pty.path(), 9600, 500)).await.unwrap();
    registers(&mut link, SMOKE, &status_read()).await; // first call waits nothing stale
    let start = Instant::now();
    registers(&mut link, SMOKE, &status_read()).await;
    let elapsed = start.elapsed();
    // 8-byte request + 13-byte reply + t3.5, 10 bits per character at 9600 baud.
    let bound = Duration::from_secs_f64((21.0 + 3.5) * 10.0 / 9600.0);
    assert!(elapsed >= bound, "{elapsed:?} < {bound:?}");
}

#[tokio::test]
async fn unsupported_functions_and_addresses_get_exceptions() {
    let sim = field(115_200);
    let pty = sim.serve_pty().unwrap();
    let mut link = Link::open(rtu(pty.path(), 115_200, 500)).await.unwrap();
    let coils = Request::ReadCoils {
        address: 0,
        count: 1,
    };
    assert_eq!(
        link.call(SMOKE, &coils).await.unwrap(),
        Err(ExceptionCode::ILLEGAL_FUNCTION)
    );
    let past_end = Request::ReadInputRegisters {
        address: 2,
        count: 3,
    };
    assert_eq!(
        link.call(SMOKE, &past_end).await.unwrap(),
        Err(ExceptionCode::ILLEGAL_DATA_ADDRESS)
    );
    let ninth = Request::WriteSingleCoil {
        address: 8,
        on: true,
    };
    assert_eq!(
        link.call(RELAY, &ninth).await.unwrap(),
        Err(ExceptionCode::ILLEGAL_DATA_ADDRESS)
    );
    assert_eq!(link.stats().exceptions, 3);
    // The remote reset register is writable, and the door answers its whole poll.
    let reset = Request::WriteSingleRegister {
        address: 16,
        value: 1,
    };
    assert_eq!(
        link.call(SMOKE, &reset).await.unwrap(),
        Ok(Response::WriteSingleRegister {
            address: 16,
            value: 1
        })
    );
    assert_eq!(sim.holding(SMOKE, 16), Some(1));
    let door = Request::ReadInputRegisters {
        address: 0,
        count: 7,
    };
    assert_eq!(registers(&mut link, DOOR, &door).await, vec![0; 7]);
}

#[tokio::test]
async fn keys_are_read_as_discrete_inputs() {
    let sim = field(115_200);
    let pty = sim.serve_pty().unwrap();
    let mut link = Link::open(rtu(pty.path(), 115_200, 500)).await.unwrap();
    sim.set_key(RELAY, 6, true);
    let reply = link
        .call(
            RELAY,
            &Request::ReadDiscreteInputs {
                address: 0,
                count: 8,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        reply,
        Ok(Response::Bits(vec![
            false, false, false, false, false, false, true, false
        ]))
    );
}

#[tokio::test]
async fn a_broadcast_write_reaches_every_unit_without_a_reply() {
    let sim = Simulator::new(
        115_200,
        [
            (UnitId(7), SimProfile::Relay),
            (UnitId(8), SimProfile::Relay),
        ],
    );
    let pty = sim.serve_pty().unwrap();
    let mut events = sim.subscribe();
    let mut link = Link::open(rtu(pty.path(), 115_200, 500)).await.unwrap();
    let req = Request::WriteSingleCoil {
        address: 0,
        on: true,
    };
    assert_eq!(
        link.call(UnitId(0), &req).await.unwrap(),
        Ok(Response::WriteSingleCoil {
            address: 0,
            on: true
        })
    );
    let mut units = vec![
        events.recv().await.unwrap().unit,
        events.recv().await.unwrap().unit,
    ];
    units.sort();
    assert_eq!(units, [UnitId(7), UnitId(8)]);
    assert_eq!(sim.coil(UnitId(8), 0), Some(true));
}

#[tokio::test]
async fn link_speaks_modbus_tcp_to_the_simulator_and_reconnects_after_a_timeout() {
    let sim = field(9600);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = sim.clone();
    tokio::spawn(async move { server.serve_tcp(listener).await });
    let settings = LinkSettings {
        transport: Transport::Tcp { addr },
        timeout: Duration::from_millis(100),
        turnaround: Duration::ZERO,
    };
    let mut link = Link::open(settings).await.unwrap();
    sim.set_smoke(SMOKE, SmokeState::Test);
    assert_eq!(registers(&mut link, SMOKE, &status_read()).await[0], 4);
    let write = Request::WriteMultipleCoils {
        address: 0,
        values: vec![true, false, true],
    };
    assert_eq!(
        link.call(RELAY, &write).await.unwrap(),
        Ok(Response::WriteMultiple {
            address: 0,
            count: 3
        })
    );
    assert_eq!(sim.coil(RELAY, 2), Some(true));

    sim.set_offline(SMOKE, true);
    assert!(matches!(
        link.call(SMOKE, &status_read()).await,
        Err(link::Error::Timeout)
    ));
    assert_eq!(registers(&mut link, SMOKE_2, &status_read()).await[0], 0);
}

#[test]
fn console_commands_change_the_field_and_bad_lines_get_a_message() {
    let sim = field(9600);
    assert_eq!(sim.console_command("alarm 1"), "unit 1 is now ALARM\n");
    assert_eq!(sim.console_command("offline 2"), "unit 2 is offline\n");
    assert_eq!(
        sim.console_command("key 100 2 on"),
        "unit 100 key 2 pressed\n"
    );
    assert!(sim
        .console_command("coils 100")
        .starts_with("unit 100 coils 0:off"));
    assert!(sim.console_command("help").contains("key K N on|off"));
    assert_eq!(sim.console_command("   "), "");
    for bad in [
        "alarm",
        "alarm x",
        "alarm 9",
        "key 1 2 on",
        "key 100 9 on",
        "key 100 1 maybe",
        "explode 1",
        "coils 1",
    ] {
        assert!(sim.console_command(bad).starts_with("error: "), "{bad}");
    }
}

#[tokio::test]
async fn console_prints_coil_writes_as_they_happen() {
    let sim = field(9600);
    let (console_in, mut feed) = tokio::io::duplex(256);
    let (mut printed, console_out) = tokio::io::duplex(4096);
    let console = sim.clone();
    let task = tokio::spawn(async move {
        console
            .run_console(tokio::io::BufReader::new(console_in), console_out)
            .await
    });
    let mut lines = tokio::io::BufReader::new(&mut printed).lines();
    assert!(lines
        .next_line()
        .await
        .unwrap()
        .unwrap()
        .contains("simulator"));
    // Wait until the console answers, so that it has subscribed before the write below.
    feed.write_all(b"normal 1\n").await.unwrap();
    assert_eq!(
        lines.next_line().await.unwrap().unwrap(),
        "unit 1 is now normal"
    );
    let at = Instant::now();
    let written = sim.handle(
        RELAY,
        Ok(&Request::WriteSingleCoil {
            address: 0,
            on: true,
        }),
        at,
    );
    assert!(written.is_some());
    let line = lines.next_line().await.unwrap().unwrap();
    assert!(line.ends_with(" unit 100 coil 0 ON"), "{line}");
    drop(feed);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn echo_setting_reads_back_our_own_bytes_so_a_dead_unit_is_not_a_successful_write() {
    let sim = field(115_200);
    sim.set_adapter_echo(true);
    let pty = sim.serve_pty().unwrap();
    let mut settings = rtu(pty.path(), 115_200, 100);
    if let Transport::Rtu { echo, .. } = &mut settings.transport {
        *echo = true;
    }
    let mut link = Link::open(settings).await.unwrap();
    sim.set_smoke(SMOKE, SmokeState::Alarm);
    assert_eq!(registers(&mut link, SMOKE, &status_read()).await[0], 1);
    sim.set_offline(RELAY, true);
    let write = Request::WriteSingleCoil {
        address: 0,
        on: true,
    };
    assert!(matches!(
        link.call(RELAY, &write).await,
        Err(link::Error::Timeout)
    ));
    sim.set_offline(RELAY, false);
    assert_eq!(
        link.call(RELAY, &write).await.unwrap(),
        Ok(Response::WriteSingleCoil {
            address: 0,
            on: true
        })
    );
}

#[tokio::test]
async fn an_unexpected_echo_is_skipped_as_stray_bytes_and_never_returned_as_the_reply() {
    let sim = field(115_200);
    sim.set_smoke(SMOKE, SmokeState::Alarm);
    sim.set_adapter_echo(true);
    let pty = sim.serve_pty().unwrap();
    let mut link = Link::open(rtu(pty.path(), 115_200, 100)).await.unwrap();
    // The echo (our own 8-byte FC04 request) cannot pass as a reply; the unit's reply after it
    // is found and validated.
    let regs = registers(&mut link, SMOKE, &status_read()).await;
    assert_eq!(regs[0], 1, "the unit's status register, not our request");
    assert_eq!(link.stats().skipped_bytes, 8);
    assert_eq!(link.stats().frame_errors, 1);
}

#[tokio::test]
async fn a_corrupted_reply_is_a_counted_crc_error_and_the_next_call_recovers() {
    let sim = field(115_200);
    let pty = sim.serve_pty().unwrap();
    let mut link = Link::open(rtu(pty.path(), 115_200, 200)).await.unwrap();
    sim.set_corrupt_replies(SMOKE, true);
    assert!(matches!(
        link.call(SMOKE, &status_read()).await,
        Err(link::Error::Frame(FrameError::Crc))
    ));
    sim.set_corrupt_replies(SMOKE, false);
    assert_eq!(registers(&mut link, SMOKE, &status_read()).await.len(), 4);
    assert_eq!(link.stats().crc_errors, 1);
}

#[tokio::test]
async fn the_pty_serves_a_gateway_that_reopens_the_port() {
    let sim = field(115_200);
    let pty = sim.serve_pty().unwrap();
    for _ in 0..3 {
        let mut link = Link::open(rtu(pty.path(), 115_200, 500)).await.unwrap();
        assert_eq!(registers(&mut link, SMOKE, &status_read()).await.len(), 4);
    }
}

#[tokio::test]
async fn a_vanished_port_is_an_io_error() {
    let sim = field(115_200);
    let pty = sim.serve_pty().unwrap();
    let mut link = Link::open(rtu(pty.path(), 115_200, 50)).await.unwrap();
    assert_eq!(registers(&mut link, SMOKE, &status_read()).await.len(), 4);
    drop(pty);
    // The simulator thread notices the drop within 50 ms and closes the pty master; until then
    // calls still succeed or time out. Bounded: 100 calls of at most ~60 ms.
    let mut saw_io = false;
    for _ in 0..100 {
        if let Err(link::Error::Io(_)) = link.call(SMOKE, &status_read()).await {
            saw_io = true;
            break;
        }
    }
    assert!(saw_io);
    assert!(link.stats().io_errors >= 1);
}

#[tokio::test]
async fn serve_port_answers_on_a_serial_device_opened_by_path() {
    // A pty slave stands in for /dev/ttyUSB0; the test plays the master on the other side.
    let pty = nix::pty::openpty(None, None).unwrap();
    let path = nix::unistd::ttyname(&pty.slave)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    // Raw before any byte is written, so the line discipline neither echoes nor buffers lines.
    let mut termios = nix::sys::termios::tcgetattr(&pty.slave).unwrap();
    nix::sys::termios::cfmakeraw(&mut termios);
    nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &termios).unwrap();
    let sim = field(19_200);
    sim.set_smoke(SMOKE, SmokeState::Test);
    let server = sim.clone();
    let serving = tokio::spawn(async move { server.serve_port(&path).await });
    let mut master = File::from(pty.master);
    let request = crate::field::frame::encode_rtu_request(SMOKE, &status_read()).unwrap();
    let reply = tokio::task::spawn_blocking(move || {
        master.write_all(&request).unwrap();
        let mut reply = vec![0u8; 13];
        master.read_exact(&mut reply).unwrap();
        reply
    });
    let reply = tokio::time::timeout(Duration::from_secs(5), reply)
        .await
        .unwrap()
        .unwrap();
    match crate::field::frame::decode_rtu_response(&reply, SMOKE, &status_read()) {
        Ok(Decoded::Complete(Ok(Response::Registers(r)), 13)) => assert_eq!(&r[..3], &[4, 0, 0]),
        other => panic!("{other:?}"),
    }
    serving.abort();
}

/// The gap on the simulator's clock between two coil writes sent back to back through `link`
/// (each stamped when its last byte arrived).
async fn gap_between_two_writes(link: &mut Link, sim: &Simulator) -> Duration {
    let mut events = sim.subscribe();
    for on in [true, false] {
        let write = Request::WriteSingleCoil { address: 0, on };
        link.call(RELAY, &write).await.unwrap().unwrap();
    }
    let first = events.recv().await.unwrap().at;
    let second = events.recv().await.unwrap().at;
    second - first
}

#[tokio::test]
async fn the_link_keeps_the_silent_interval_and_the_turnaround_after_every_reply() {
    let sim = field(9600);
    let pty = sim.serve_pty().unwrap();
    // 9600 8N1: an FC05 frame is 8 bytes = 8.33 ms; the simulator answers t3.5 (3.65 ms) after
    // the request; the link then stays quiet for t3.5 (4.01 ms at 11 bits, Serial Line V1.02
    // §2.5.1.1) plus the turnaround before the next request, which takes 8.33 ms to arrive.
    let wire = crate::field::frame::wire_time(8, 9600, 10);
    let floor = wire * 2 + crate::field::frame::silent_interval_for(9600, 10) * 2;
    let mut settings = rtu(pty.path(), 9600, 200);
    settings.turnaround = Duration::ZERO;
    let mut link = Link::open(settings.clone()).await.unwrap();
    let gap = gap_between_two_writes(&mut link, &sim).await;
    assert!(gap >= floor, "{gap:?} < {floor:?}");
    drop(link);

    settings.turnaround = Duration::from_millis(40);
    let mut link = Link::open(settings).await.unwrap();
    let gap = gap_between_two_writes(&mut link, &sim).await;
    let floor = floor + Duration::from_millis(40);
    assert!(gap >= floor, "turnaround not kept: {gap:?} < {floor:?}");
}

#[tokio::test]
async fn a_stray_byte_that_looks_like_a_long_frame_head_delays_but_does_not_lose_the_reply() {
    let sim = field(115_200);
    sim.set_smoke(SMOKE, SmokeState::Alarm);
    let pty = sim.serve_pty().unwrap();
    let mut link = Link::open(rtu(pty.path(), 115_200, 50)).await.unwrap();
    // Unit 1, FC04, byte count 250: a frame that would need 255 bytes. The reply behind it is
    // taken only once the deadline shows that frame will never complete.
    sim.inject(SMOKE, ReplyFault::StrayBytes(vec![0x01, 0x04, 0xFA]), 1);
    let regs = registers(&mut link, SMOKE, &status_read()).await;
    assert_eq!(regs[0], 1);
    assert_eq!(link.stats().skipped_bytes, 3);
    // Plain noise in front is skipped at once.
    sim.inject(SMOKE, ReplyFault::StrayBytes(vec![0x00, 0xFF]), 1);
    assert_eq!(registers(&mut link, SMOKE, &status_read()).await[0], 1);
    assert_eq!(link.stats().skipped_bytes, 5);
    assert_eq!(link.stats().failures(), 0);
}
