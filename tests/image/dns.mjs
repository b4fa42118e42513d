// A DNS server for the image test: answers A queries for the names it is
// given and NXDOMAIN for any other, over UDP, so that the static binary's
// resolver is exercised the way a pod's is (through /etc/resolv.conf).
//   node dns.mjs --address 127.0.9.1 --port 53 --record login.example.test=127.0.9.2
// Prints "listening" once bound, then one line per query: "<type> <name>".
import dgram from 'node:dgram';

const args = process.argv.slice(2);
let address = '127.0.0.1';
let port = 53;
const records = new Map();
for (let i = 0; i < args.length; i += 2) {
  const value = args[i + 1];
  switch (args[i]) {
    case '--address': address = value; break;
    case '--port': port = Number(value); break;
    case '--record': {
      const [name, ip] = value.split('=');
      records.set(name.toLowerCase(), ip.split('.').map(Number));
      break;
    }
    default: throw new Error(`unknown argument ${args[i]}`);
  }
}

const TYPE_A = 1;
const TYPE_NAMES = { 1: 'A', 28: 'AAAA' };

function question(packet) {
  const labels = [];
  let at = 12;
  while (at < packet.length && packet[at] !== 0) {
    const length = packet[at];
    if (length > 63) throw new Error('compressed or bad label in a question');
    labels.push(packet.subarray(at + 1, at + 1 + length).toString('latin1'));
    at += 1 + length;
  }
  if (at + 5 > packet.length) throw new Error('short question');
  const type = packet.readUInt16BE(at + 1);
  return { name: labels.join('.').toLowerCase(), type, end: at + 5 };
}

function answer(packet) {
  const q = question(packet);
  const address = records.get(q.name);
  const answers = address && q.type === TYPE_A ? [address] : [];
  const header = Buffer.alloc(12);
  header.writeUInt16BE(packet.readUInt16BE(0), 0);
  const recursionDesired = packet[2] & 0x01;
  header[2] = 0x84 | recursionDesired; // a response, authoritative
  header[3] = 0x80 | (address ? 0 : 3); // recursion available; NXDOMAIN for unknown names
  header.writeUInt16BE(1, 4);
  header.writeUInt16BE(answers.length, 6);
  const parts = [header, packet.subarray(12, q.end)];
  for (const ip of answers) {
    const record = Buffer.alloc(16);
    record.writeUInt16BE(0xc00c, 0); // the name of the question
    record.writeUInt16BE(TYPE_A, 2);
    record.writeUInt16BE(1, 4); // IN
    record.writeUInt32BE(5, 6); // TTL
    record.writeUInt16BE(4, 10);
    Buffer.from(ip).copy(record, 12);
    parts.push(record);
  }
  process.stdout.write(`${TYPE_NAMES[q.type] ?? q.type} ${q.name}\n`);
  return Buffer.concat(parts);
}

const socket = dgram.createSocket('udp4');
socket.on('message', (packet, peer) => {
  try {
    socket.send(answer(packet), peer.port, peer.address);
  } catch (err) {
    process.stderr.write(`dns: ${err.message}\n`);
  }
});
socket.on('error', (err) => { process.stderr.write(`dns: ${err.stack ?? err}\n`); process.exit(1); });
socket.bind(port, address, () => process.stdout.write('listening\n'));
