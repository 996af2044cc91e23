# The measurement behind nginx-test/bench/slow-clients.
use strict;
use warnings;
use IO::Socket::INET;
use IO::Select;
use Socket qw(SOL_SOCKET SO_LINGER);
use Time::HiRes qw(time sleep);
use Edge::Test qw(http_get);

my ($idle, $dribble) = @ARGV;
my $timeout = 5;
my $t = Edge::Test->new;
$t->write_routes('routes.json', <<'JSON');
{"upstreams": {"b": {"servers": ["127.0.0.1:%%PORT_b%%"]}}, "default": "b"}
JSON
$t->config(<<"CONF", workers => 2);
    edge_routes %%TESTDIR%%/routes.json;
    server { listen 127.0.0.1:%%PORT_edge%% backlog=16384; edge_route auto; preread_timeout ${timeout}s;
             proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_b%%; return "ok"; }
CONF
# Room for the slow connections: raise the worker limits in the generated nginx.conf.
my $conf = $t->read_file('nginx.conf');
$conf =~ s/worker_connections 1024;/worker_connections 19000;/;
$conf =~ s/^(daemon off;)/$1\nworker_rlimit_nofile 19000;/m;
$t->write_file('nginx.conf', $conf);
$t->run;
my $edge = $t->port('edge');

# Open the slow connections, in batches, non-blocking.
my (@socks, %opened, %kind);
my $t0 = time;
for my $i (1 .. $idle + $dribble) {
    my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$edge", Blocking => 0) or die "socket $i: $!";
    push @socks, $s;
    $opened{fileno $s} = time;
    $kind{fileno $s} = $i <= $idle ? 'idle' : 'dribble';
}
my $opening = time - $t0;

# Watch them close; dribble one byte a second; meanwhile a normal client every 20 ms.
my $hello = "\x16\x03\x01\x00\x40\x01\x00\x00\x3c\x03\x03" . ('x' x 64);
my $sel = IO::Select->new(@socks);
my (%closed_after, @lat, $fail, $sent_bytes);
$fail = 0;
my $next_byte = time + 1;
my $byte = 0;
my $next_client = time;
my $deadline = time + $timeout + 30;
while ($sel->count && time < $deadline) {
    for my $s ($sel->can_read(0.01)) {
        my $n = sysread($s, my $buf, 100);
        next if defined $n && $n > 0;
        $closed_after{$kind{fileno $s}}{fileno $s} = time - $opened{fileno $s};
        $sel->remove($s);
        close $s;
    }
    if (time >= $next_byte) {
        for my $s ($sel->handles) {
            next unless $kind{fileno $s} eq 'dribble';
            syswrite($s, substr($hello, $byte % length $hello, 1));
        }
        $byte++;
        $next_byte += 1;
    }
    if (time >= $next_client) {
        my $start = time;
        my $r = eval { http_get($edge, 'normal.test', timeout => 10) } // '';
        push @lat, (time - $start) * 1000;
        $fail++ unless $r eq 'ok';
        $next_client = time + 0.02;
    }
}
my $still_open = $sel->count;

sub pct { my ($p, @v) = @_; @v = sort { $a <=> $b } @v; return @v ? $v[int($p / 100 * $#v)] : 0 }
printf "slow clients against nginx-edge (2 workers, preread_timeout %ds), opened in %.1f s\n", $timeout, $opening;
printf "%-34s %7s %9s %9s %9s %9s\n", 'connections', 'count', 'closed', 'min s', 'median s', 'max s';
for my $k (qw(idle dribble)) {
    my @v = values %{$closed_after{$k} // {}};
    printf "%-34s %7d %9d %9.2f %9.2f %9.2f\n",
        $k eq 'idle' ? 'send nothing' : 'one ClientHello byte per second',
        $k eq 'idle' ? $idle : $dribble, scalar @v, pct(0, @v), pct(50, @v), pct(100, @v);
}
printf "still open at the end: %d\n", $still_open;
printf "normal client meanwhile: %d connections, %d failed, latency median %.1f ms, p99 %.1f ms, max %.1f ms\n",
    scalar @lat, $fail, pct(50, @lat), pct(99, @lat), pct(100, @lat);
my $errors = () = $t->read_file('error.log') =~ /\[(alert|crit|emerg)\]/g;
printf "error.log: %d alert/crit/emerg lines; %d preread timeouts logged at info (with the client address)\n", $errors,
    scalar(() = $t->read_file('error.log') =~ /within preread_timeout/g);

# Stop nginx while Test::More is still there to ask (not during global destruction).
undef $t;
