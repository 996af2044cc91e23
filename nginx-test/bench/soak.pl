# The measurement behind nginx-test/bench/soak.
use strict;
use warnings;
use POSIX ();
use Time::HiRes qw(time sleep);
use Edge::Test;

my $target = shift // 1_000_000;
my $names = 100;
my $t = Edge::Test->new;
my $dir = $t->dir;

# Name nI goes to backend A when I is even, B when odd, in every version of the table; the
# versions differ in an extra route and in the order of everything.
sub table {
    my ($version) = @_;
    my @routes = map { sprintf '"n%d.soak.test": "%s"', $_, $_ % 2 ? 'b' : 'a' } 0 .. $names - 1;
    push @routes, qq{"extra$version.soak.test": "a"};
    @routes = reverse @routes if $version % 2;
    my @up = ('"a": {"servers": ["127.0.0.1:%%PORT_a%%"]}', '"b": {"servers": ["127.0.0.1:%%PORT_b%%"]}');
    @up = reverse @up if $version % 2;
    return "{\n \"upstreams\": {" . join(', ', @up) . "},\n \"routes\": {\n  " . join(",\n  ", @routes) . "\n }\n}\n";
}
$t->write_routes('routes.json', table(0));
$t->config(<<'CONF', workers => 2);
    edge_routes %%TESTDIR%%/routes.json interval=200ms;
    server { listen 127.0.0.1:%%PORT_edge%% backlog=4096; edge_route http; proxy_pass $edge_upstream; }
CONF
# Quiet logs for a long run; HTTP backends that say which Host and backend they saw.
my $conf = $t->read_file('nginx.conf');
$conf =~ s/error_log (\S+) info;/error_log $1 notice;/;
$conf =~ s/access_log \S+ edge;/access_log off;/;
$conf =~ s/worker_connections 1024;/worker_connections 8192;/;
$conf .= $t->expand(<<'HTTP');
http {
    access_log off;
    server { listen 127.0.0.1:%%PORT_a%%; return 200 "$host A\n"; }
    server { listen 127.0.0.1:%%PORT_b%%; return 200 "$host B\n"; }
}
HTTP
$t->write_file('nginx.conf', $conf);
$t->run;
my $edge = $t->port('edge');

$t->write_file('check.lua', <<'LUA');
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) bad = 0; checked = 0 end
request = function()
    local i = math.random(0, 99)
    return wrk.format("GET", "/", {["Host"] = "n" .. i .. ".soak.test", ["Connection"] = "close"})
end
response = function(status, headers, body)
    checked = checked + 1
    local i, b = string.match(body or "", "^n(%d+)%.soak%.test (%u)")
    local want = (tonumber(i or "-1") % 2 == 1) and "B" or "A"
    if status ~= 200 or i == nil or b ~= want then bad = bad + 1 end
end
done = function(summary, latency, requests)
    local b, c = 0, 0
    for _, t in ipairs(threads) do b = b + t:get("bad"); c = c + t:get("checked") end
    io.write(string.format("checked %d misrouted %d\n", c, b))
end
LUA

sub workers {
    my $master = $t->pid;
    my @w;
    for my $stat (glob '/proc/[0-9]*/stat') {
        open my $f, '<', $stat or next;
        my $line = <$f> // '';
        next unless $line =~ /^(\d+) \(nginx\) \S (\d+)/ && $2 == $master;
        push @w, $1;
    }
    return sort { $a <=> $b } @w;
}
sub sample {
    my @out;
    for my $pid (workers()) {
        open my $f, '<', "/proc/$pid/status" or next;
        my ($rss) = do { local $/; <$f> } =~ /VmRSS:\s+(\d+)/;
        my $fds = () = glob "/proc/$pid/fd/*";
        push @out, [$pid, $rss, $fds];
    }
    return @out;
}

# Measure the rate first, then run wrk long enough for the target.
my $probe = `wrk -t2 -c64 -d3s -s $dir/check.lua http://127.0.0.1:$edge/ 2>&1`;
my ($rate) = $probe =~ /Requests\/sec:\s+([\d.]+)/;
die "wrk failed:\n$probe" unless $rate;
my $seconds = int($target / $rate) + 1;

my $swapper = fork() // die;
if ($swapper == 0) {
    my $v = 1;
    while (1) { $t->write_routes('routes.json', table($v++)); sleep 1 }
}
my $wrk = fork() // die;
if ($wrk == 0) {
    open STDOUT, '>', "$dir/wrk.out";
    exec 'wrk', '-t2', '-c64', "-d${seconds}s", '-s', "$dir/check.lua", "http://127.0.0.1:$edge/";
}
my @samples;
my $start = time;
while (waitpid($wrk, POSIX::WNOHANG()) == 0) {
    push @samples, [time - $start, sample()];
    sleep 5;
}
kill 'KILL', $swapper;
waitpid($swapper, 0);
push @samples, [time - $start, sample()];
my $w = $t->read_file('wrk.out');
my ($requests) = $w =~ /(\d+) requests in/;
my ($checked, $bad) = $w =~ /checked (\d+) misrouted (\d+)/;
my ($errors) = 0;
$errors += $_ for $w =~ /(?:connect|read|write|timeout) (\d+)/g;
my $swaps = () = $t->read_file('error.log') =~ /table \d+ loaded/g;
my $served = () = $t->read_file('error.log') =~ /table \d+ in service/g;
my $alerts = () = $t->read_file('error.log') =~ /\[(alert|crit|emerg)\]/g;

printf "soak: %d connections in %.0f s (%.0f/s) through nginx-edge, 2 workers, table swapped every second\n",
    $requests // 0, $samples[-1][0], ($requests // 0) / ($samples[-1][0] || 1);
printf "responses checked %d, misrouted %d, socket errors %d, tables read %d (once per change for the edge), swapped in %d (by each worker), alert/crit lines %d\n",
    $checked // 0, $bad // 0, $errors, $swaps, $served, $alerts;
printf "%8s  %s\n", 'time s', join('  ', map { sprintf '%13s %9s %4s', 'worker pid', 'RSS kB', 'fds' } @{$samples[0]}[1 .. $#{$samples[0]}]);
my $every = @samples > 14 ? int(@samples / 12) : 1;
for my $i (0 .. $#samples) {
    next unless $i % $every == 0 || $i == $#samples;
    my ($at, @w) = @{$samples[$i]};
    printf "%8.0f  %s\n", $at, join('  ', map { sprintf '%13d %9d %4d', $_->[0], $_->[1], $_->[2] } @w);
}

# Stop nginx while Test::More is still there to ask (not during global destruction).
undef $t;
