# The measurement behind nginx-test/bench/detection: one nginx with the module, Perl backends
# stopped and started, the edge_status JSON polled every 20 ms.
use strict;
use warnings;
use Time::HiRes qw(time sleep);
use Edge::Test qw(http_get wait_for);

my $trials = shift // 5;
my $t = Edge::Test->new;
$t->write_routes('routes.json', <<'JSON');
{
  "upstreams": {
    "tcp":  {"servers": ["127.0.0.1:%%PORT_tcp%%"],  "check": {"type": "tcp"}},
    "http": {"servers": ["127.0.0.1:%%PORT_http%%"], "check": {"type": "http"}},
    "passive": {"servers": ["127.0.0.1:%%PORT_pas%%", "127.0.0.1:%%PORT_other%%"]}
  },
  "routes": {"passive.test": "passive"}
}
JSON
$t->backend('tcp');
$t->backend('http', mode => 'http');
$t->backend('pas');
$t->config(<<'CONF', workers => 2);
    edge_routes %%TESTDIR%%/routes.json;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
    server { listen 127.0.0.1:%%PORT_other%%; return "other"; }
CONF
$t->run;
my $status = $t->port('status');
my $edge = $t->port('edge');
my $down = sub { my ($u, $name) = @_;
    (Edge::Test::server_state($status, $u, '127.0.0.1:' . $t->port($name)) // {})->{down} };

sub until_true {
    my ($cond) = @_;
    my $start = time;
    while (!$cond->()) { sleep 0.02; die "no change within 60 s\n" if time - $start > 60 }
    return time - $start;
}

my @rows;
for my $check (qw(tcp http)) {
    wait_for(sub { !$down->($check, $check) }, "$check up", 60);
    for my $trial (1 .. $trials) {
        # Stop at a random point of the check interval.
        sleep rand 2;
        $t->stop_backend($check);
        my $d = until_true(sub { $down->($check, $check) });
        sleep rand 2;
        $t->backend($check, $check eq 'http' ? (mode => 'http') : ());
        my $u = until_true(sub { !$down->($check, $check) });
        push @rows, ["$check check", $trial, $d, $u];
    }
}
# Passive: a client connects every 100 ms; the server is out at the first refused connect and
# back at the first connect after fail_timeout that succeeds.
for my $trial (1 .. ($trials > 2 ? 2 : $trials)) {
    $t->stop_backend('pas');
    my $start = time;
    until ($down->('passive', 'pas')) { http_get($edge, 'passive.test'); sleep 0.1 }
    my $d = time - $start;
    $t->backend('pas');
    $start = time;
    while ($down->('passive', 'pas')) { http_get($edge, 'passive.test'); sleep 0.1 }
    push @rows, ['passive, 10 conn/s', $trial, $d, time - $start];
}

printf "%-20s %5s %16s %18s\n", 'detection', 'trial', 'stop -> down (s)', 'restart -> up (s)';
printf "%-20s %5d %16.2f %18.2f\n", @$_ for @rows;
for my $kind (qw(tcp http)) {
    my @r = grep { $_->[0] eq "$kind check" } @rows;
    my ($dmin, $dmax) = (sort { $a <=> $b } map { $_->[2] } @r)[0, -1];
    my ($umin, $umax) = (sort { $a <=> $b } map { $_->[3] } @r)[0, -1];
    printf "%-20s %5s %16s %18s\n", "$kind check range", '', sprintf('%.2f-%.2f', $dmin, $dmax),
        sprintf('%.2f-%.2f', $umin, $umax);
}
print "expected bounds at the defaults: down within fall x interval = 6 s (+ timeout 1 s for a\n"
    . "silent server), up within rise x interval = 4 s; passive: down at the first failed connect,\n"
    . "up at the first successful connect once fail_timeout (10 s) has passed.\n";

# Stop nginx while Test::More is still there to ask (not during global destruction).
undef $t;
